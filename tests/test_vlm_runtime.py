"""The VLM facade (fmrt.runtime.vlm) on the torch backend: loading and routing, prompt formats
(generate / chat / few-shot), batching, streaming, stop strings, cancellation, request
validation, image decoding, pointing coordinates for non-square inputs, HF LLaVA parity."""
import base64
import io
import os

import numpy as np
import pytest
import torch

import fmrt
from fmrt.runtime.vlm import (VlmBatchRun, VlmModel, VlmRequest, VlmRequestError, VlmResult,
                              decode_image_url)


# ----------------------------------------------------------------------------- fixtures
def make_tiny_llava(path: str, *, seed: int = 0, std: float = 0.3, **overrides) -> str:
    """A random ``shapes-llava-tiny`` (64 px CLIP tower, 64 image tokens, 4-layer LM) with the
    ShapesWorld VLM tokenizer, saved as an fmrt model directory. ``std``: LM init scale (larger
    than HF's 0.02 so greedy argmaxes are not near-ties: logit gaps >> 1e-5 backend noise). The
    ``<image>`` embedding row is zeroed (it is always replaced by image features as an input),
    so the tied head does not favour emitting placeholders, which decode to nothing."""
    from fmrt.data.vlm_data import build_vlm_tokenizer
    from fmrt.preprocess import PreprocessConfig
    from fmrt.pretrained import save_pretrained

    torch.manual_seed(seed)
    m = fmrt.create_model("shapes-llava-tiny", **overrides).eval()
    m.language_model.reset_parameters(std=std)
    with torch.no_grad():
        m.language_model.embed_tokens.weight[m.config.image_token_id].zero_()
    pre = PreprocessConfig(image_size=64, mean=(0.85, 0.83, 0.81), std=(0.25, 0.26, 0.29),
                           resize_mode="squash", interpolation="bilinear")
    return save_pretrained(path, family="llava", model=m, config=m.config.to_dict(),
                           preprocess=pre, tokenizer=build_vlm_tokenizer())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The host is shared (2 cores, many processes): 2 intra-op threads make these tiny models
    # ~20x slower (1.4 s vs 0.07 s for a 3-image few-shot answer) from OpenMP waits.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flamingo():
    return fmrt.load("shapes-flamingo")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def llava(llava_dir):
    return fmrt.load(llava_dir)


@pytest.fixture(scope="module")
def episode():
    from fmrt.data.flamingo_data import sample_episode

    return sample_episode("test", "color", 3, 3)


def _few_shot(ep):
    prompt = "".join(f"<image> output : {c.answer} <|endofchunk|>" for c in ep[:-1])
    return [c.image for c in ep], prompt + "<image> output :"


def _img(h=48, w=80, seed=0):
    return np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)


def _png_b64(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- loading
def test_load_routes_to_vlm_facade(flamingo, llava):
    assert isinstance(flamingo, VlmModel) and flamingo.family == "flamingo"
    assert flamingo.backend == "torch" and flamingo.name == "shapes-flamingo"
    assert flamingo.context_length == 256 and flamingo.max_images == 8
    assert llava.family == "llava" and llava.context_length == 256
    assert llava.max_images == 3  # (256 - 16) // 64 image tokens
    with pytest.raises(fmrt.runtime.RuntimeLoadError):
        fmrt.load("shapes-flamingo", backend="nope")


# ----------------------------------------------------------------------------- flamingo
def test_flamingo_generate_matches_model_generate(flamingo, episode):
    """The facade's prompt + batched session reproduce Flamingo.generate's greedy tokens."""
    from fmrt.models.flamingo import pad_image_lists

    images, prompt = _few_shot(episode)
    text = flamingo.generate(images, prompt, max_new_tokens=8)
    tok = flamingo.tokenizer
    ids = tok._tk.encode(prompt, add_special_tokens=False).ids
    m = flamingo.torch_model
    ref = m.generate(pad_image_lists([images], flamingo.preprocess), [[tok.sot_token_id] + ids],
                     max_new_tokens=8)[0]
    assert text == " ".join(tok.decode(ref.tokens).split())
    assert text == episode[-1].answer   # the bundled model gets this 2-shot colour right


def test_flamingo_chat_equals_generate(flamingo, episode):
    images, prompt = _few_shot(episode)
    msgs = []
    for c in episode[:-1]:
        msgs += [{"role": "user", "content": [{"type": "image", "image": c.image},
                                              {"type": "text", "text": "output :"}]},
                 {"role": "assistant", "content": c.answer}]
    msgs.append({"role": "system", "content": "ignored"})
    msgs.append({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                            + _png_b64(episode[-1].image)}},
        {"type": "text", "text": "output :"}]})
    assert flamingo.chat(msgs, max_new_tokens=8) == flamingo.generate(images, prompt,
                                                                      max_new_tokens=8)
    # a plain question is asked in the explicit QA form of training
    fmt = flamingo._format
    assert fmt.wrap("what color is the circle?") == "question : what color is the circle? answer :"


def test_batch_equals_single_requests(flamingo, episode):
    images, prompt = _few_shot(episode)
    reqs = [VlmRequest(images=images, prompt=prompt, max_new_tokens=6),
            VlmRequest(images=[images[0]], prompt="how many shapes are there?", max_new_tokens=6),
            VlmRequest(images=[], prompt="output :", max_new_tokens=6)]
    run = flamingo.start_batch(reqs)
    assert isinstance(run, VlmBatchRun)
    batched = run.run()
    assert all(isinstance(r, VlmResult) for r in batched)
    for r, req in zip(batched, reqs):
        solo = flamingo.start_batch([VlmRequest(images=req.images, prompt=req.prompt,
                                                max_new_tokens=6)]).run()[0]
        assert (r.text, r.finish_reason, r.completion_tokens) == (
            solo.text, solo.finish_reason, solo.completion_tokens)
        assert r.prompt_tokens == len(req._prepared.ids)


# ----------------------------------------------------------------------------- streaming
def test_streaming_concatenates_to_text(llava, flamingo, episode):
    img = _img()
    for kw in ({}, {"stop": ["circle"]}, {"temperature": 0.8, "seed": 5}):
        full = llava.generate([img], "describe the image.", max_new_tokens=24, **kw)
        pieces = list(llava.generate([img], "describe the image.", max_new_tokens=24,
                                     stream=True, **kw))
        assert "".join(pieces) == full and len(pieces) > 1
    images, prompt = _few_shot(episode)
    assert "".join(flamingo.generate(images, prompt, stream=True)) == flamingo.generate(
        images, prompt)


def test_stop_strings_and_seeded_sampling(llava):
    img = _img()
    full = llava.generate([img], "describe the image.", max_new_tokens=16)
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = llava.generate([img], "describe the image.", max_new_tokens=16, stop=stop)
    assert cut == full[:full.index(stop)]
    req = VlmRequest(images=[img], prompt="describe the image.", max_new_tokens=16, stop=[stop])
    r = llava.start_batch([req]).run()[0]
    assert r.finish_reason == "stop" and r.text == cut
    a = llava.generate([img], "x", max_new_tokens=12, temperature=1.5, seed=7)
    b = llava.generate([img], "x", max_new_tokens=12, temperature=1.5, seed=7)
    c = llava.generate([img], "x", max_new_tokens=12, temperature=1.5, seed=8)
    assert a == b and a != c


def test_cancel_frees_row(llava):
    reqs = [VlmRequest(images=[_img(seed=i)], prompt="describe the image.", max_new_tokens=20)
            for i in range(3)]
    run = llava.start_batch(reqs)
    it = iter(run)
    first = next(it)
    assert len(first) == 3 and all(isinstance(p, str) for p in first)
    assert run._session.cache.batch_size == 3
    run.cancel(1)
    rest = list(it)
    assert all(step[1] is None for step in rest)
    assert run._session is None  # released at the end
    res = run.results
    assert res[1].finish_reason == "cancelled" and res[1].completion_tokens == 1
    assert res[0].finish_reason == res[2].finish_reason == "length"
    solo = llava.start_batch([VlmRequest(images=[_img(seed=2)], prompt="describe the image.",
                                         max_new_tokens=20)]).run()[0]
    assert res[2].text == solo.text   # the remaining rows continue unchanged
    # the cancelled row left the batch: the KV cache shrank to 2 rows at the next step
    run2 = llava.start_batch([VlmRequest(images=[_img()], prompt="a", max_new_tokens=5)
                              for _ in range(3)])
    it2 = iter(run2)
    next(it2)
    run2.cancel(0)
    next(it2)
    assert run2._session.cache.batch_size == 2
    with pytest.raises(IndexError):
        run2.cancel(3)


# ----------------------------------------------------------------------------- validation
def test_bad_requests_raise_vlm_request_error(llava, flamingo):
    img = _img()
    bad = [
        (llava, dict(images=[img] * 4, prompt="hi"), "exceed the limit of 3"),
        (flamingo, dict(images=[img] * 9, prompt="hi"), "exceed the limit of 8"),
        (llava, dict(images=["data:image/png;base64,AAAA"], prompt="hi"), "image"),
        (llava, dict(images=[np.zeros((4, 4), np.float32)], prompt="hi"), "uint8"),
        (llava, dict(images=[img], prompt="hi", max_new_tokens=250), "context length"),
        (llava, dict(images=[img], prompt="red " * 300), "context length"),
        (llava, dict(messages=[]), "empty"),
        (llava, dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
        (llava, dict(messages=[{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]), "last message"),
        (llava, dict(messages=[{"role": "user", "content": [{"type": "video"}]}]), "type"),
        (llava, dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!notb64"}}]}]),
         "base64"),
        (llava, dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": base64.b64encode(b"hello").decode()}}]}]),
         "not a recognised image"),
        (llava, dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
         "remote"),
        (llava, dict(messages=[{"role": "user", "content": "hi"}], images=[img]), "inside"),
        (llava, dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "exactly one"),
        (llava, dict(prompt="hi", temperature=-1), "temperature"),
        (llava, dict(prompt="hi", top_p=0), "top_p"),
        (llava, dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
        (llava, dict(prompt="hi", stop=[""]), "stop"),
        (llava, dict(prompt="hi", seed="x"), "seed"),
        (flamingo, dict(images=[img], prompt="<image> a <image> b"), "markers"),
    ]
    for model, kw, msg in bad:
        with pytest.raises(VlmRequestError, match=msg):
            model.validate(VlmRequest(**kw))
    assert issubclass(VlmRequestError, ValueError)
    with pytest.raises(VlmRequestError):
        llava.chat([{"role": "user", "content": 5}])
    with pytest.raises(VlmRequestError):   # validation happens before the stream starts
        llava.generate([img] * 5, "hi", stream=True)
    with pytest.raises(VlmRequestError):
        llava.start_batch([])
    # a valid request passes and keeps its prepared form for start_batch
    req = VlmRequest(images=[img], prompt="how many circles are there?")
    llava.validate(req)
    assert req._prepared.ids[0] == llava.tokenizer.sot_token_id
    assert req._prepared.first_size == (80, 48)


def test_decode_image_url_formats():
    img = _img(9, 13)
    b64 = _png_b64(img)
    for url in (b64, "data:image/png;base64," + b64, "data:;base64," + b64,
                b64[:20] + "\n" + b64[20:]):
        assert np.array_equal(decode_image_url(url), img)
    rgba = np.concatenate([img, np.full((9, 13, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(decode_image_url(_png_b64(rgba)), img)
    for bad in ("", "data:text/plain;base64," + b64, "data:image/png," + b64, "@@@", 5):
        with pytest.raises(VlmRequestError):
            decode_image_url(bad)


# ----------------------------------------------------------------------------- pointing
class _ScriptedLM:
    """An LM whose logits force a fixed answer (one row): the rest of the facade (prompt,
    detokenisation, rescaling to the original image, streaming hold-back, parsing) is real."""

    def __init__(self, tokens, vocab):
        self.tokens, self.vocab = list(tokens), vocab

    def open(self, ids_rows, image_rows, max_len):
        lm = self

        class S:
            i = 0

            def _logits(self):
                x = torch.zeros(len(ids_rows), lm.vocab)
                x[:, lm.tokens[min(self.i, len(lm.tokens) - 1)]] = 1.0
                self.i += 1
                return x

            def prefill(self):
                return self._logits()

            def step(self, toks):
                return self._logits()

            def keep(self, rows):
                pass

        return S()


def test_point_rescales_to_original_non_square_image(llava_dir):
    from fmrt.data import ShapesWorld, as_rng, point_answer
    from fmrt.data.vlm_data import encode_text

    vlm = fmrt.load(llava_dir)
    world = ShapesWorld(image_size=64, seed=0)
    scene = world.sample_scene(as_rng(np.random.default_rng(3)), num_objects=3)
    shape = scene.objects[0].shape
    answer = point_answer(scene, shape)          # in the model's 64 x 64 frame
    tok = vlm.tokenizer
    script = encode_text(tok, answer) + [tok.eot_token_id]
    vlm._lm = _ScriptedLM(script, vlm.torch_model.config.text.vocab_size)
    h, w = 96, 160                               # non-square original (x 2.5 wide, x 1.5 tall)
    big = torch.nn.functional.interpolate(
        torch.from_numpy(scene.render()).permute(2, 0, 1)[None].float(), size=(h, w),
        mode="nearest")[0].permute(1, 2, 0).byte().numpy()
    out = vlm.point(big, f"{shape}s")
    want = [((x + 0.5) * w / 64 - 0.5, (y + 0.5) * h / 64 - 0.5)
            for x, y in (o.center for o in scene.objects if o.shape == shape)]
    assert out["count"] == len(want) and len(out["points"]) == len(want)
    for (px, py) in out["points"]:   # every point lands on a matching object's centre (+-1 px)
        assert min(abs(px - x) + abs(py - y) for x, y in want) <= 2.0
    assert f'x="{int(out["points"][0][0])}"' in out["text"]
    # streaming yields the same rescaled text (a tag is held back until it is complete)
    vlm._lm = _ScriptedLM(script, vlm.torch_model.config.text.vocab_size)
    pieces = list(vlm.generate([big], f"point to the {shape}s", max_new_tokens=160, stream=True))
    assert "".join(pieces) == out["text"]
    assert all(p.count("<") == p.count(">") for p in pieces)


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(fmrt.__file__), "weights",
                                                   "shapes-llava")),
                    reason="shapes-llava is not bundled yet")
def test_bundled_llava_points_on_non_square_image():
    from fmrt.data import ShapesWorld, as_rng

    vlm = fmrt.load("shapes-llava")
    scene = ShapesWorld(image_size=64, seed=0).sample_scene(as_rng(np.random.default_rng(5)))
    shape = scene.objects[0].shape
    small = vlm.point(scene.render(), f"{shape}s")
    big = np.repeat(np.repeat(scene.render(), 3, axis=0), 2, axis=1)   # 192 x 128
    out = vlm.point(big, f"{shape}s")
    assert out["count"] == small["count"]
    for (x, y), (sx, sy) in zip(out["points"], small["points"]):
        assert abs(x - ((sx + 0.5) * 2 - 0.5)) <= 2 and abs(y - ((sy + 0.5) * 3 - 0.5)) <= 3


# ----------------------------------------------------------------------------- HF LLaVA
def test_hf_llava_dir_through_facade(tmp_path):
    """A transformers LLaVA directory (plus a ShapesWorld tokenizer) loads behind the facade and
    greedy-decodes the same tokens as transformers' generate."""
    transformers = pytest.importorskip("transformers")
    from fmrt.data.vlm_data import build_vlm_tokenizer

    torch.manual_seed(0)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128,
                                  initializer_range=0.1)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=99,
                                   image_seq_length=16)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    build_vlm_tokenizer().save(str(tmp_path))
    vlm = fmrt.load(str(tmp_path))
    assert vlm.family == "llava" and vlm.image_size == 32
    img = _img(40, 30)
    req = VlmRequest(images=[img], prompt="what color is the circle?", max_new_tokens=8)
    vlm.validate(req)
    run = vlm.start_batch([req])
    res = run.run()[0]
    from fmrt.preprocess import preprocess_images

    px = preprocess_images([img], vlm.preprocess)
    ids = torch.tensor([req._prepared.ids])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=False,
                          eos_token_id=[2], pad_token_id=0)[0, ids.shape[1]:].tolist()
    ref = ref[:ref.index(2)] if 2 in ref else ref
    assert run.rows[0].tokens == ref
    assert res.text == vlm._format.detok(ref)


def test_llava_runner_still_works(llava_dir):
    from fmrt.models.llava import LlavaRunner

    r = LlavaRunner(llava_dir)
    vlm = fmrt.load(llava_dir)
    img = _img()
    assert r.generate([img], "describe the image.", max_new_tokens=10) == vlm.generate(
        [img], "describe the image.", max_new_tokens=10)

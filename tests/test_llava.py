"""LLaVA: Hugging Face parity and loading, the ShapesWorld VLM vocabulary and instruction data,
pointing coordinates, the two-stage trainer (smoke) and the bundled shapes-llava (smoke)."""
import json
import os

import numpy as np
import pytest
import torch

import fmrt
from fmrt.data import parse_point_answer, point_answer
from fmrt.data.vlm_data import (IGNORE, InstructionStream, build_vlm_tokenizer, decode_answer,
                                encode_conversation, encode_example, point_hits, prompt_ids,
                                rescale_point_text, rescale_points, special_ids)
from fmrt.models.llava import LlavaCheckpointError, LlavaForConditionalGeneration

transformers = pytest.importorskip("transformers")

IMG_TOKEN = 99


@pytest.fixture(scope="module")
def hf_llava_dir(tmp_path_factory):
    """A randomly initialised tiny transformers LLaVA (CLIP 32px/patch 8: 16 image tokens,
    3 layers; LLaMA 2 layers, GQA 4/2), saved with save_pretrained."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as HFLlava

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16)
    tc = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMG_TOKEN,
                      image_seq_length=16)
    m = HFLlava(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a missed weight would show
        for n, p in m.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf_llava")
    m.save_pretrained(d)
    return str(d), m


def _prompt_batch():
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 5, 7] + [IMG_TOKEN] * 16 + [8, 9, 10],
                        [1, 3] + [IMG_TOKEN] * 16 + [4, 11, 12, 13]])
    return ids, px


def test_hf_llava_parity(hf_llava_dir):
    path, hf = hf_llava_dir
    m = fmrt.create_model(None, checkpoint=path)
    assert isinstance(m, LlavaForConditionalGeneration)
    assert m.config.image_seq_length == 16 and m.config.vision_feature_layer == -2
    ids, px = _prompt_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        out = m(ids, px)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4
    # the "full" strategy keeps the class token: one more image token per image
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["vision_feature_select_strategy"] == "default"


def test_hf_llava_greedy_tokens_match(hf_llava_dir):
    path, hf = hf_llava_dir
    m = fmrt.create_model(None, checkpoint=path)
    ids, px = _prompt_batch()
    ids, px = ids[:1], px[:1]
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    res = m.generate([ids[0].tolist()], px, max_new_tokens=6, stop_token_ids=[])
    assert res[0].tokens == ref


def test_hf_llava_other_key_layout(hf_llava_dir, tmp_path):
    """transformers 4.5x layout: model.vision_tower.vision_model.*, model.language_model.*,
    model.multi_modal_projector.*, lm_head.weight."""
    from safetensors.torch import load_file, save_file

    path, hf = hf_llava_dir
    sd = load_file(os.path.join(path, "model.safetensors"))
    new = {}
    for k, v in sd.items():
        if k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
        elif k.startswith("multi_modal_projector."):
            k = "model." + k
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        elif k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        new[k] = v
    save_file(new, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    m = fmrt.create_model(None, checkpoint=str(tmp_path))
    ids, px = _prompt_batch()
    with torch.no_grad():
        assert (m(ids, px) - hf(input_ids=ids, pixel_values=px).logits).abs().max() < 1e-4
    # a broken checkpoint is reported, not silently half-loaded
    del new["lm_head.weight"]
    save_file(new, str(tmp_path / "model.safetensors"))
    with pytest.raises(LlavaCheckpointError, match="missing"):
        fmrt.create_model(None, checkpoint=str(tmp_path))


def test_image_token_count_mismatch_raises(hf_llava_dir):
    m = fmrt.create_model(None, checkpoint=hf_llava_dir[0])
    ids, px = _prompt_batch()
    with pytest.raises(ValueError, match="image tokens"):
        m(ids[:, 3:], px)  # row 1 loses one of its 16 image placeholders
    with pytest.raises(ValueError, match="no pixel_values"):
        m(ids)


def test_linear_projector_and_fmrt_roundtrip(tmp_path):
    from fmrt.pretrained import load_pretrained, save_pretrained
    from fmrt.preprocess import PreprocessConfig

    m = fmrt.create_model("shapes-llava-tiny", projector="linear").eval()
    assert not hasattr(m.projector, "linear_2")
    save_pretrained(str(tmp_path), family="llava", model=m, config=m.config.to_dict(),
                    preprocess=PreprocessConfig(image_size=64))
    p = load_pretrained(str(tmp_path))
    ids = torch.tensor([[1] + [86] * 64 + [40, 87]])
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(p.model(ids, px), m(ids, px))
    m2 = fmrt.create_model(None, checkpoint=str(tmp_path))
    assert isinstance(m2, LlavaForConditionalGeneration)


def test_image_pos_embed_default_off_and_learned():
    m = fmrt.create_model("shapes-llava-tiny").eval()
    assert m.config.image_pos_embed == "none" and not hasattr(m, "image_pos_embed")
    with pytest.raises(ValueError, match="image_pos_embed"):
        fmrt.create_model("shapes-llava-tiny", image_pos_embed="sinusoidal")
    torch.manual_seed(0)
    ml = fmrt.create_model("shapes-llava-tiny", image_pos_embed="learned").eval()
    ml.load_state_dict({**m.state_dict(), "image_pos_embed": ml.image_pos_embed.detach()})
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base, f = m.image_features(px), ml.image_features(px)
        # image_features = projector output + one learned vector per patch position
        assert torch.allclose(f - base, ml.image_pos_embed.expand(2, -1, -1), atol=1e-5)
        assert torch.allclose(ml.project_hidden(ml.vision_hidden(px)), f)
        ids = torch.tensor([[1] + [86] * 64 + [40, 87]])
        assert torch.allclose(ml(ids, px[:1]), ml(ids, image_features=f[:1]))


def test_image_feature_norm_default_off_and_rms():
    m = fmrt.create_model("shapes-llava-tiny").eval()
    assert m.config.image_feature_norm == "none" and not hasattr(m, "image_norm")
    with pytest.raises(ValueError, match="image_feature_norm"):
        fmrt.create_model("shapes-llava-tiny", image_feature_norm="layer")
    mn = fmrt.create_model("shapes-llava-tiny", image_feature_norm="rms").eval()
    mn.load_state_dict({**m.state_dict(), "image_norm.weight": mn.image_norm.weight.detach()})
    px = 10 * torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base, f = m.image_features(px), mn.image_features(px)
        # image_features = RMSNorm(projector output): every token at norm 0.1 * sqrt(160)
        assert torch.allclose(f.norm(dim=-1), torch.full((2, 64), 0.1 * 160 ** 0.5), rtol=1e-3)
        want = base / base.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * 0.1
        assert torch.allclose(f, want, atol=1e-5)
        ids = torch.tensor([[1] + [86] * 64 + [40, 87]])
        assert torch.allclose(mn(ids, px[:1]), mn(ids, image_features=f[:1]))


def test_answer_loss_weighting():
    import torch.nn.functional as F

    from fmrt.train.llava import LlavaTrainConfig, answer_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 8, 10)
    # row 0: a 3-token answer (positions 3-5) and a 1-token one (7); row 1: one token (2)
    labels = torch.full((2, 8), -100)
    labels[0, 3:6] = torch.tensor([5, 6, 7])
    labels[0, 7] = 8
    labels[1, 2] = 3
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="none").reshape(2, 7)
    per_answer = (ce[0, 2:5].mean() + ce[0, 6] + ce[1, 1]) / 3
    per_token = (ce[0, 2:5].sum() + ce[0, 6] + ce[1, 1]) / 5
    assert torch.allclose(answer_loss(logits, labels, "answer"), per_answer)
    assert torch.allclose(answer_loss(logits, labels), per_token)
    # sqrt: an answer of L tokens weighs sqrt(L), each of its tokens 1 / sqrt(L)
    w3 = 3 ** -0.5
    per_sqrt = (w3 * ce[0, 2:5].sum() + ce[0, 6] + ce[1, 1]) / (3 * w3 + 2)
    assert torch.allclose(answer_loss(logits, labels, "sqrt"), per_sqrt)
    with pytest.raises(ValueError, match="weighting"):
        answer_loss(logits, labels, "row")
    assert answer_loss(logits, torch.full((2, 8), -100)) == 0.0
    with pytest.raises(ValueError, match="loss_weighting"):
        LlavaTrainConfig(loss_weighting="row")


# ----------------------------------------------------------------------------- vocabulary / data
def test_vlm_tokenizer_specials_and_point_roundtrip(tmp_path):
    tok = build_vlm_tokenizer()
    img, sep = special_ids(tok)
    assert (img, sep) == (86, 87)  # shapes-llava-tiny's image_token_id
    assert tok.vocab_size <= fmrt.create_model("shapes-llava-tiny").config.text.vocab_size
    tok.save(str(tmp_path))
    from fmrt.models.tokenizer import load_tokenizer

    tok2 = load_tokenizer(str(tmp_path))
    assert special_ids(tok2) == (86, 87)
    ans = ('<point x="5" y="40"> <point x="63" y="0"> counting the red circles shows a total '
           'of 2.')
    ids = tok2._tk.encode(ans, add_special_tokens=False).ids
    assert tok2.unk_token_id not in ids
    text = decode_answer(tok2, ids)
    assert text == ans
    pts, n = parse_point_answer(text)
    assert n == 2 and pts.tolist() == [[5, 40], [63, 0]]


def test_coordinate_tokens_roundtrip_and_clamp(tmp_path):
    from fmrt.data.vlm_data import coord_token_ids, encode_text
    from fmrt.models.tokenizer import load_tokenizer

    tok = build_vlm_tokenizer(coord_tokens=64)
    assert special_ids(tok) == (86, 87)             # word ids unchanged: models can be grown
    assert coord_token_ids(tok) == list(range(88, 152)) and tok.vocab_size == 152
    assert coord_token_ids(build_vlm_tokenizer()) == []
    tok.save(str(tmp_path))
    tok2 = load_tokenizer(str(tmp_path))
    assert coord_token_ids(tok2) == list(range(88, 152))
    ans = ('<point x="5" y="40"> <point x="63" y="0"> counting the red circles shows a total '
           'of 2.')
    ids = encode_text(tok2, ans)
    # one token per value (x = " <loc5> " ...): 4 tokens where the digits "5 4 0 6 3 0" are 6
    assert ids.count(88 + 5) == 1 and ids.count(88 + 63) == 1 and ids.count(88 + 0) == 1
    assert len(ids) == len(encode_text(build_vlm_tokenizer(), ans)) - 2
    assert tok2.unk_token_id not in ids and decode_answer(tok2, ids) == ans
    assert parse_point_answer(decode_answer(tok2, ids))[0].tolist() == [[5, 40], [63, 0]]
    # values are rounded and clamped to the frame; other numbers stay digits
    assert decode_answer(tok2, encode_text(tok2, '<point x="70" y="-3"> <point x="4.6" '
                                                 'y="9">')) == \
        '<point x="63" y="0"> <point x="5" y="9">'
    assert encode_text(tok2, "a total of 12.") == encode_text(build_vlm_tokenizer(),
                                                              "a total of 12.")


def test_coordinate_token_loss_and_embedding_init():
    import torch.nn.functional as F

    from fmrt.models.llama import LlamaConfig, LlamaForCausalLM
    from fmrt.train.llava import answer_loss, init_coord_embeddings

    torch.manual_seed(0)
    V, coord = 20, list(range(10, 20))
    logits = torch.randn(2, 6, V, dtype=torch.float64)
    labels = torch.full((2, 6), -100)
    labels[0, 2:5] = torch.tensor([3, 14, 15])
    labels[1, 5] = 11
    # a vanishing sigma is the one-hot cross-entropy
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    assert torch.allclose(answer_loss(logits, labels, coord_ids=coord, coord_sigma=1e-3), ce)
    # sigma 1: the coordinate targets are a normalised Gaussian over the 10 values
    lp = torch.log_softmax(logits, -1)
    k = torch.arange(10.0, dtype=torch.float64)

    def soft(row, pos, v):
        q = torch.exp(-0.5 * (k - v) ** 2)
        return -(q / q.sum() * lp[row, pos, 10:]).sum()
    want = (-lp[0, 1, 3] + soft(0, 2, 4) + soft(0, 3, 5) + soft(1, 4, 1)) / 4
    assert torch.allclose(answer_loss(logits, labels, coord_ids=coord, coord_sigma=1.0), want)
    # the answer weightings apply to the same per-token terms: one 3-token answer in row 0,
    # one 1-token answer in row 1
    terms = [-lp[0, 1, 3], soft(0, 2, 4), soft(0, 3, 5), soft(1, 4, 1)]
    per_answer = ((terms[0] + terms[1] + terms[2]) / 3 + terms[3]) / 2
    assert torch.allclose(answer_loss(logits, labels, "answer", coord_ids=coord,
                                      coord_sigma=1.0), per_answer)
    # growing the tied table keeps the old rows; the smooth init orders the new ones
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_layers=1, num_heads=2, num_kv_heads=1))
    old = lm.embed_tokens.weight.detach().clone()
    lm.resize_token_embeddings(160)
    assert lm.config.vocab_size == 160 and lm.embed_tokens.weight.shape == (160, 32)
    assert torch.equal(lm.embed_tokens.weight[:96], old) and lm(torch.tensor([[159]])).shape[-1] == 160
    with pytest.raises(ValueError, match="shrink"):
        lm.resize_token_embeddings(64)
    ids = list(range(96, 160))
    init_coord_embeddings(lm, ids)
    e = F.normalize(lm.embed_tokens.weight[ids].double(), dim=1)
    cos = e @ e.T
    near, far = torch.diagonal(cos, 1).mean(), torch.diagonal(cos, 16).mean()
    assert near > 0.9 and far < 0.3, (near, far)
    assert abs(lm.embed_tokens.weight[ids].norm(dim=1).mean() / old.norm(dim=1).mean() - 1) < 0.1


def test_prompt_and_labels_cover_answers_only():
    tok = build_vlm_tokenizer()
    ids, labels = encode_example(tok, "how many shapes are there?", "three", 64)
    p = prompt_ids(tok, "how many shapes are there?", 64)
    assert ids[:len(p)] == p and p.count(86) == 64 and p[-1] == 87
    assert all(x == IGNORE for x in labels[:len(p)])
    assert decode_answer(tok, [t for t in labels if t != IGNORE]) == "three"
    ids2, lab2 = encode_conversation(tok, [("how many shapes are there?", "three"),
                                           ("is there a red star?", "no")], 64)
    assert ids2[:len(ids)] == ids  # the first turn is the inference format
    kept = [t for t in lab2 if t != IGNORE]
    assert kept == [tok.token_to_id("three"), tok.eot_token_id, tok.token_to_id("no"),
                    tok.eot_token_id]


def test_instruction_stream_deterministic_and_shapes():
    tok = build_vlm_tokenizer()
    s = InstructionStream(tok, stage=2, batch_size=6, turns=3)
    a, b = s(3), s(3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["images"], b["images"])
    assert a["images"].shape == (6, 64, 64, 3) and a["input_ids"].shape == a["labels"].shape
    assert a["input_ids"].shape[1] <= 256
    assert ((a["input_ids"] == 86).sum(1) == 64).all()
    s1 = InstructionStream(tok, stage=1, batch_size=4, turns=2)(0)
    assert all(k == ["caption", "caption"] for k in s1["kinds"])


def test_patch_labels_follow_the_rendered_objects():
    from fmrt.data import ShapesWorld
    from fmrt.data.vlm_data import patch_labels
    from fmrt.data.vocab import COLOR_INDEX, COLORS, SHAPE_INDEX

    w = ShapesWorld(image_size=64, seed=5)
    scenes = [w.sample_scene() for _ in range(4)]
    lab = patch_labels(scenes, 8)
    assert lab.shape == (4, 64) and lab.dtype == np.int64
    for sc, row in zip(scenes, lab):
        grid = row.reshape(8, 8)
        for o in sc.objects:
            # the patch holding the object's centroid pixel, when the object fills most of it,
            # carries its (shape, colour) class
            cx, cy = int(o.center[0]), int(o.center[1])
            block = sc.label_map()[cy // 8 * 8:cy // 8 * 8 + 8, cx // 8 * 8:cx // 8 * 8 + 8]
            idx = sc.objects.index(o) + 1
            if (block == idx).sum() > 32:
                assert grid[cy // 8, cx // 8] == 1 + SHAPE_INDEX[o.shape] * len(COLORS) + \
                    COLOR_INDEX[o.color]
        # background patches (no object pixel at all) are 0
        lm = sc.label_map().reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
        assert (row[(lm == 0).all(1)] == 0).all()
    tok = build_vlm_tokenizer()
    b = InstructionStream(tok, stage=2, batch_size=3, turns=2, patch_grid=8)(0)
    assert b["patch_labels"].shape == (3, 64) and int(b["patch_labels"].max()) <= 24


def test_position_code_2d():
    from fmrt.train.llava import position_code_2d

    e = position_code_2d(8, 160, norm=2.0).double()
    assert e.shape == (64, 160) and torch.allclose(e.norm(dim=1), torch.full((64,), 2.0, dtype=torch.float64))
    g = (e @ e.t()) / 4.0                       # cosines
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    same_row = (rows[:, None] == rows[None]) & (cols[:, None] != cols[None])
    other = (rows[:, None] != rows[None]) & (cols[:, None] != cols[None])
    # sharing a row (or column) leaves half the code in common; nothing else is close
    assert g[same_row].max() < 0.5 and g[other].abs().max() < 0.2
    full = position_code_2d(8, 160, full=True)
    assert full.shape == (65, 160) and not full[0].any()
    with pytest.raises(ValueError):
        position_code_2d(8, 161)


def test_rescale_points_any_size():
    from fmrt.data import ShapesWorld

    pts = np.array([[0.0, 0.0], [63.0, 31.5]])
    big = rescale_points(pts, (64, 64), (128, 96))
    assert np.allclose(big, [[0.5, 0.25], [126.5, 47.5]])
    assert np.allclose(rescale_points(big, (128, 96), (64, 64)), pts)
    txt = rescale_point_text('<point x="10" y="20"> counting ... 1.', (64, 64), (256, 256))
    assert parse_point_answer(txt)[0].tolist() == [[42, 82]]
    # ground truth at 128 px lands inside the objects at 64 px after rescaling, and vice versa
    w = ShapesWorld(image_size=128, seed=3)
    sc = w.sample_scene()
    o = sc.objects[0]
    q = f"point to the {o.color} {o.shape}s"
    hits, n = point_hits(sc, q, parse_point_answer(point_answer(sc, o.shape, o.color))[0])
    assert hits == n >= 1


def test_train_two_stages_smoke(tmp_path):
    from fmrt.pretrained import load_pretrained
    from fmrt.train.llava import LlavaTrainConfig, evaluate_llava, train

    s1 = train(LlavaTrainConfig(stage=1, steps=2, batch_size=3, out_dir=str(tmp_path / "s1"),
                                threads=1, lm_steps=2, lm_batch_size=3,
                                image_pos_embed="learned"), progress=False)
    p1 = load_pretrained(s1)
    m1 = p1.model
    clip = load_pretrained("shapes-clip").model  # stage 1 keeps shapes-clip's tower frozen
    assert torch.allclose(m1.vision_tower.conv1.weight, clip.visual.conv1.weight)
    assert m1.config.image_pos_embed == "learned" and m1.image_pos_embed.shape == (64, 160)
    assert p1.config["provenance"]["train_config"]["extra"]["lm_warmup"]["steps"] == 2
    s2 = train(LlavaTrainConfig(stage=2, steps=2, batch_size=3, init_from=s1, tune_vision=True,
                                out_dir=str(tmp_path / "s2"), threads=1), progress=False)
    p2 = load_pretrained(s2)
    assert p2.family == "llava" and special_ids(p2.tokenizer) == (86, 87)
    assert not torch.equal(p2.model.language_model.layers[0].mlp.gate_up.weight,
                           m1.language_model.layers[0].mlp.gate_up.weight)
    # stage 2 fine-tunes the tower with tune_vision ...
    assert not torch.equal(p2.model.vision_tower.conv1.weight, m1.vision_tower.conv1.weight)
    # ... and keeps it frozen by default
    s2f = train(LlavaTrainConfig(stage=2, steps=1, batch_size=2, init_from=s1,
                                 out_dir=str(tmp_path / "s2f"), threads=1, qa_first_steps=1,
                                 loss_weighting="answer", turns=4), progress=False)
    assert torch.equal(load_pretrained(s2f).model.vision_tower.conv1.weight,
                       m1.vision_tower.conv1.weight)
    # continuing a model trained without them: the RMSNorm and the (zero-initialised)
    # position embedding are added and saved; the dense auxiliary head trains but is not saved
    s2n = train(LlavaTrainConfig(stage=2, steps=1, batch_size=2, init_from=s2f,
                                 out_dir=str(tmp_path / "s2n"), threads=1,
                                 image_feature_norm="rms", dense_aux_weight=0.5),
                progress=False)
    mn = load_pretrained(s2n).model
    assert mn.config.image_feature_norm == "rms" and hasattr(mn, "image_norm")
    # the grid2d initialisation of the position embedding (s1 has a learned one)
    from fmrt.train.llava import position_code_2d

    s2g = train(LlavaTrainConfig(stage=2, steps=1, batch_size=2, init_from=s1, lr=1e-9,
                                 out_dir=str(tmp_path / "s2g"), threads=1,
                                 image_pos_init="grid2d", image_pos_norm=0.5), progress=False)
    assert torch.allclose(load_pretrained(s2g).model.image_pos_embed,
                          position_code_2d(8, 160, 0.5), atol=1e-4)
    assert not any(k.startswith("aux") for k in mn.state_dict())
    # coordinate tokens added to a digit model: the tokenizer gains <loc0..63>, the tied
    # table grows to 160 (old rows kept), and the runner decodes points back to digits
    from fmrt.data.vlm_data import coord_token_ids

    s2c = train(LlavaTrainConfig(stage=2, steps=1, batch_size=2, init_from=s2f, lr=1e-9,
                                 out_dir=str(tmp_path / "s2c"), threads=1, coord_tokens=64,
                                 coord_sigma=1.0), progress=False)
    pc = load_pretrained(s2c)
    assert coord_token_ids(pc.tokenizer) == list(range(88, 152))
    assert pc.model.config.text.vocab_size == 160
    assert torch.allclose(pc.model.language_model.embed_tokens.weight[:88],
                          load_pretrained(s2f).model.language_model.embed_tokens.weight[:88])
    with pytest.raises(ValueError, match="coordinate tokens"):
        train(LlavaTrainConfig(stage=2, steps=1, batch_size=2, init_from=s2c,
                               out_dir=str(tmp_path / "s2d"), threads=1, coord_tokens=32),
              progress=False)
    prov = p2.config["provenance"]
    assert prov["stage"] == 2 and prov["previous_stages"][0]["stage"] == 1
    r = evaluate_llava(s2, n_images=2, include_describe=False)
    assert 0.0 <= r["qa_exact"] <= 1.0 and "point_count_exact" in r
    from fmrt.models.llava import LlavaRunner

    run = LlavaRunner(s2)  # any image size (squashed to 64 px)
    out = run.point(np.full((96, 80, 3), 240, np.uint8), "red circles", max_new_tokens=3)
    assert isinstance(out["text"], str) and isinstance(out["points"], list)


def test_independent_turns_score_each_turn_as_if_alone():
    """A packed row of independent turns gives every turn exactly the logits of the
    single-question sequence ``prompt_ids(question) + answer`` (odd lengths, padding, GQA)."""
    from fmrt.data.vlm_data import encode_example, encode_independent_turns

    torch.manual_seed(0)
    tok = build_vlm_tokenizer(coord_tokens=64)
    model = fmrt.create_model("shapes-llava-tiny", text={"vocab_size": 160}).eval()
    n_img = model.config.image_seq_length
    turns = [("how many shapes are there?", "three"), ("is there a red star?", "no"),
             ("point to the blue circles", '<point x="12" y="40"> counting the blue circles '
              'shows a total of 1.'), ("what color is the square?", "green")]
    ids, labels, segs, pos = encode_independent_turns(tok, turns, n_img)
    assert len(ids) == len(labels) == len(segs) == len(pos)
    short, _, s2, p2 = encode_independent_turns(tok, turns[:1], n_img)
    pad = len(ids) - len(short)   # second row: one turn, padded (segment -1, position 0)
    batch_ids = torch.tensor([ids, short + [0] * pad])
    batch_segs = torch.tensor([segs, s2 + [-1] * pad])
    batch_pos = torch.tensor([pos, p2 + [0] * pad])
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        packed = model(batch_ids, px, position_ids=batch_pos, segment_ids=batch_segs)
        assert torch.isfinite(packed).all()
        start = 1 + n_img
        for j, (q, a) in enumerate(turns):
            alone, _ = encode_example(tok, q, a, n_img)
            ref = model(torch.tensor([alone]), px[:1])[0]
            if j == 0:
                got = packed[0, :len(alone)]
            else:
                sel = [i for i, s in enumerate(segs) if s == j + 1]
                got = torch.cat([packed[0, :start], packed[0, sel]])
            assert torch.allclose(got, ref, atol=1e-5), j
    with pytest.raises(ValueError, match="segment_ids"):
        model(batch_ids, px, segment_ids=batch_segs, attention_mask=torch.ones_like(batch_ids)
              .index_fill_(1, torch.tensor([0]), 0))
    # the stream's packing matches, and training takes the flag
    st = InstructionStream(tok, stage=2, batch_size=3, turns=4, independent_turns=True)(0)
    assert st["segment_ids"].shape == st["input_ids"].shape == st["position_ids"].shape
    assert (st["segment_ids"][:, :start] == 0).all()
    assert (st["position_ids"][:, start:][st["segment_ids"][:, start:] > 0] >= start).all()


def test_train_stage1_tower_choice_and_class_token(tmp_path):
    """``vision_from`` picks the CLIP-family tower; ``vision_select="full"`` keeps its class
    token as a 65th image token through training, the facade and its prompts."""
    from fmrt.models.llava import LlavaRunner
    from fmrt.pretrained import load_pretrained
    from fmrt.train.llava import LlavaTrainConfig, train

    with pytest.raises(ValueError, match="vision_select"):
        LlavaTrainConfig(vision_select="cls")
    s1 = train(LlavaTrainConfig(stage=1, steps=1, batch_size=2, out_dir=str(tmp_path / "s1"),
                                threads=1, vision_from="shapes-negclip", vision_select="full",
                                untie_embeddings=True, coord_tokens=64), progress=False)
    m1 = load_pretrained(s1).model
    # an untied output head that starts with the same coordinate code as the input table
    lm = m1.language_model
    assert lm.lm_head is not None and not m1.config.text.tie_word_embeddings
    assert torch.equal(lm.lm_head.weight[88:152], lm.embed_tokens.weight[88:152])
    assert not torch.equal(lm.lm_head.weight[:88], lm.embed_tokens.weight[:88])
    neg = load_pretrained("shapes-negclip").model
    assert torch.allclose(m1.vision_tower.conv1.weight, neg.visual.conv1.weight)
    assert m1.config.vision_feature_select_strategy == "full"
    assert m1.config.image_seq_length == 65
    s2 = train(LlavaTrainConfig(stage=2, steps=1, batch_size=2, init_from=s1, turns=3,
                                independent_turns=True, out_dir=str(tmp_path / "s2"),
                                threads=1), progress=False)
    px = torch.zeros(2, 3, 64, 64)
    assert load_pretrained(s2).model.image_features(px).shape == (2, 65, 160)
    out = LlavaRunner(s2).generate([np.full((40, 50, 3), 200, np.uint8)], "is there a red star?",
                                   max_new_tokens=2)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="vision tower mismatch"):
        train(LlavaTrainConfig(stage=1, steps=1, batch_size=2, out_dir=str(tmp_path / "bad"),
                               threads=1, vision_from="shapes-sam"), progress=False)


@pytest.mark.skipif("shapes-llava" not in fmrt.pretrained.list_pretrained(),
                    reason="shapes-llava is not bundled")
def test_bundled_shapes_llava_smoke():
    from fmrt.data import ShapesWorld, answer
    from fmrt.pretrained import load_pretrained
    from fmrt.preprocess import uint8_batch_to_tensor

    p = load_pretrained("shapes-llava")
    w = ShapesWorld(image_size=64, seed=123)
    scenes = [w.sample_scene() for _ in range(8)]
    q = "how many shapes are there?"
    imgs = uint8_batch_to_tensor(np.stack([s.render() for s in scenes]), p.preprocess)
    res = p.model.generate([prompt_ids(p.tokenizer, q, 64)] * 8, imgs, max_new_tokens=3,
                           stop_token_ids=[p.tokenizer.eot_token_id])
    got = [decode_answer(p.tokenizer, r.tokens) for r in res]
    assert sum(g == answer(s, q) for g, s in zip(got, scenes)) >= 5
    # pointing on a 128 px image: the runtime answers in that image's pixels
    from fmrt.models.llava import LlavaRunner

    big = ShapesWorld(image_size=128, seed=5).sample_scene()
    o = big.objects[0]
    q = f"point to the {o.color} {o.shape}s"
    out = LlavaRunner("shapes-llava").point(big.render(), f"{o.color} {o.shape}s")
    hits, n = point_hits(big, q, np.array(out["points"]))
    assert n >= 1 and hits >= n - 1


# Regression guards, not the issue #5 targets (QA >= 0.85, points inside >= 0.90, exact counts
# >= 0.85 on 200 test scenes), which are NOT met yet (BENCHMARKS.md). On these 40 held-out scenes
# (160 short questions, 40 pointing answers) the bundled model (session 7: NegCLIP tower,
# independent turns, untied head) scores QA 0.794, points inside 11 of 73 (0.15), exact count
# 0.700; the session-6 bundle scored 0.744 / 0.18 / 0.675. Pointing is still weak, so its floor
# mainly catches a broken format, tokenizer or parser. Raise these when a better model is bundled.
N_SCENES = 40
QA_MIN, INSIDE_MIN, COUNT_MIN = 0.70, 0.10, 0.60


@pytest.mark.skipif("shapes-llava" not in fmrt.pretrained.list_pretrained(),
                    reason="shapes-llava is not bundled")
def test_bundled_shapes_llava_heldout_answers_and_points():
    """The bundled model on N_SCENES held-out test scenes (every short question and the
    pointing question of each) against regression floors (see above)."""
    from fmrt.data.vlm_data import QA_KINDS, eval_examples
    from fmrt.pretrained import load_pretrained
    from fmrt.train.llava import _answers

    assert "shapes-llava" in fmrt.pretrained.list_pretrained()
    p = load_pretrained("shapes-llava")
    assert p.family == "llava"
    ex = eval_examples(N_SCENES, seed=0)
    qa = [e for e in ex if e["kind"] in QA_KINDS]
    pt = [e for e in ex if e["kind"] == "point"]
    got = _answers(p.model, p.tokenizer, p.preprocess, qa + pt, 100)
    qa_ok = [g.strip() == e["answer"] for g, e in zip(got, qa)]
    assert np.mean(qa_ok) >= QA_MIN, list(zip(got, [e["answer"] for e in qa]))
    hits = total = exact = 0
    for g, e in zip(got[len(qa):], pt):
        pts, n = parse_point_answer(g)
        h, k = point_hits(e["scene"], e["question"], pts)
        hits, total = hits + h, total + k
        exact += int(n == parse_point_answer(e["answer"])[1])
    assert total and hits / total >= INSIDE_MIN
    assert exact / len(pt) >= COUNT_MIN

"""The torch facade (ClipRuntime), the retrieval index and the weights registry."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import fmrt
from fmrt.preprocess import InvalidImageError, PreprocessConfig, preprocess_images
from fmrt.runtime import RetrievalIndex
from fmrt.runtime.clip import ClassifyInputError
from tests.helpers import make_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def rt(model_dir):
    return fmrt.load(model_dir, backend="torch")


def _imgs(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_encode_shapes_and_normalisation(rt):
    e = rt.encode_image(_imgs(3) + [np.zeros((17, 90, 3), np.uint8)])
    assert e.shape == (4, rt.embed_dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    t = rt.encode_text(["a red circle", "two blue squares"])
    assert t.shape == (2, rt.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_facade_matches_model(rt, model_dir):
    from fmrt.pretrained import load_pretrained

    p = load_pretrained(model_dir)
    imgs = _imgs(2)
    x = preprocess_images(imgs, p.preprocess)
    with torch.no_grad():
        ref = p.model.encode_image(x, normalize=True).numpy()
        tref = p.model.encode_text(p.tokenizer(["a red circle"]), normalize=True).numpy()
    np.testing.assert_allclose(rt.encode_image(imgs), ref, atol=1e-5)
    np.testing.assert_allclose(rt.encode_text(["a red circle"]), tref, atol=1e-5)


def test_batching_is_invisible(rt):
    rt2 = rt
    imgs = _imgs(5)
    full = rt2.encode_image(imgs)
    old, rt2.max_batch = rt2.max_batch, 2
    try:
        np.testing.assert_allclose(rt2.encode_image(imgs), full, atol=1e-5)
    finally:
        rt2.max_batch = old


def test_classify(rt):
    labels = ["red circle", "blue square", "orange star"]
    p = rt.classify(_imgs(4), labels)
    assert p.shape == (4, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    # Ensemble = mean of normalised template embeddings, re-normalised.
    w = rt.text_classifier(labels, ["a {}", "the {}"])
    e = rt.encode_text(["a red circle", "the red circle"])
    ref = e.mean(0) / np.linalg.norm(e.mean(0))
    np.testing.assert_allclose(w[0], ref, atol=1e-5)


@pytest.mark.parametrize("labels,templates", [([], None), (["x"] * 1001, None), ([3], None),
                                              (["a"], ["no placeholder"]), (["a"], [])])
def test_classify_bad_input(rt, labels, templates):
    with pytest.raises(ClassifyInputError):
        rt.classify(_imgs(1), labels, templates)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8),
                                 np.zeros((0, 8, 3), np.uint8), "not an image",
                                 np.zeros((9000, 2, 3), np.uint8)])
def test_bad_images(rt, bad):
    with pytest.raises(InvalidImageError):
        rt.encode_image([bad])


def test_gray_and_rgba_accepted(rt):
    e = rt.encode_image([np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8)])
    assert e.shape == (2, rt.embed_dim)


def test_preprocess_shortest_side_crop():
    cfg = PreprocessConfig(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, 32:96] = 255  # the centre crop of the resized 32x64 frame is exactly the white band
    x = preprocess_images([img], cfg)
    assert x.shape == (1, 3, 32, 32)
    assert float(x[0, :, :, 2:-2].min()) > 0.95


def test_index_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((257, 16)).astype(np.float32)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    idx = RetrievalIndex(16)
    idx.add(g[:100])
    idx.add(g[100:], ids=[f"x{i}" for i in range(100, 257)])
    scores, ids = idx.search(q, k=7)
    ref = np.argsort(-(q @ g.T), axis=1)[:, :7]
    names = [[i if i < 100 else f"x{i}" for i in row] for row in ref.tolist()]
    assert ids == names
    np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, ref, 1), rtol=1e-5, atol=1e-5)
    idx.save(str(tmp_path / "i.npz"))
    idx2 = RetrievalIndex.load(str(tmp_path / "i.npz"))
    assert idx2.search(q, k=7)[1] == ids
    # k larger than the gallery returns every item
    assert len(idx.search(q[:1], k=10_000)[1][0]) == 257
    with pytest.raises(ValueError):
        idx.search(q, k=0)
    with pytest.raises(ValueError):
        idx.add(np.zeros((2, 3), np.float32))


def test_index_fp16(rt):
    idx = rt.index(dtype="float16")
    e = rt.encode_image(_imgs(6))
    idx.add(e)
    s, ids = idx.search(e, k=1)
    assert [r[0] for r in ids] == list(range(6))
    np.testing.assert_allclose(s[:, 0], 1.0, atol=2e-3)


def test_unknown_model_and_backend(model_dir):
    from fmrt.runtime import RuntimeLoadError

    with pytest.raises(RuntimeLoadError):
        fmrt.load("no-such-model")
    with pytest.raises(RuntimeLoadError):
        fmrt.load(model_dir, backend="cuda-magic")


def test_pretrained_roundtrip_half(tmp_path, model_dir):
    from fmrt.pretrained import load_pretrained, save_pretrained

    p = load_pretrained(model_dir)
    save_pretrained(str(tmp_path / "h"), family="clip", model=p.model, config=p.config["config"],
                    preprocess=p.preprocess, tokenizer=p.tokenizer, half=True)
    q = load_pretrained(str(tmp_path / "h"))
    assert next(q.model.parameters()).dtype == torch.float32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        d = (q.model.encode_image(x, True) - p.model.encode_image(x, True)).abs().max()
    assert float(d) < 5e-3  # float16 storage: ~3 significant digits per weight


def test_create_model_from_bundle_dir(model_dir):
    m = fmrt.create_model(checkpoint=model_dir)
    assert isinstance(m, fmrt.models.CLIP)


def test_sharded_weights_roundtrip(tmp_path, model_dir):
    from fmrt import pretrained

    p = pretrained.load_pretrained(model_dir)
    d = pretrained.save_pretrained(str(tmp_path / "s"), family="clip", model=p.model,
                                   config=p.config["config"], preprocess=p.preprocess,
                                   tokenizer=p.tokenizer, max_shard_bytes=1_000_000)
    files = pretrained.weight_files(d)
    assert len(files) > 1 and all(os.path.getsize(f) < 1_100_000 for f in files)
    q = pretrained.load_pretrained(d)
    for k, v in p.model.state_dict().items():
        assert torch.equal(v, q.model.state_dict()[k])
    rt = fmrt.load(d)
    assert rt.logit_scale == pytest.approx(float(p.model.scale()), rel=1e-6)
    os.remove(files[-1])
    with pytest.raises(pretrained.PretrainedError):
        pretrained.load_pretrained(d)

"""CuPL: text sources (OpenAI-compatible endpoint against a local stub, callable, JSON file,
ShapesWorld offline describer), the description cache, label sets (build, store, serve helper)
and the ShapesWorld evaluation with the bundled shapes-clip."""
from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest

from fmrt.chain import cupl as C
from fmrt.chain import labelsets as L
from fmrt.data import class_labels, tokenize, vocabulary
from tests.helpers import json_stub_server


# ------------------------------------------------------------------------------- stub LLM server
class _Stub:
    def __init__(self, mode="ok"):
        self.mode, self.requests = mode, []


@pytest.fixture()
def stub_server():
    stub = _Stub()

    def respond(path, body, headers):
        stub.requests.append({"path": path, "body": body, "auth": headers.get("Authorization")})
        if stub.mode == "error":
            return 500, b"upstream exploded"
        if stub.mode == "malformed":
            return 200, {"nope": 1}
        prompt = body["messages"][-1]["content"]
        k = 1 if stub.mode == "ignore_n" else body["n"]
        return 200, {"choices": [
            {"index": i, "message": {"role": "assistant",
                                     "content": f' "Answer {len(stub.requests)}.{i} to: '
                                                f'{prompt}"\nsecond line'}}
            for i in range(k)]}

    with json_stub_server(respond) as url:
        yield stub, url + "/v1"


def test_prompts_and_cleaning():
    assert C.format_prompt("What does a {} look like?", "orange star") == \
        "What does an orange star look like?"
    assert C.format_prompt("A caption of an image of a {}:", "red circle") == \
        "A caption of an image of a red circle:"
    assert len(C.CUPL_PROMPTS) == 5 and all("{}" in p for p in C.CUPL_PROMPTS)
    assert C.clean_description('  1. "A red circle is round."\nmore') == "A red circle is round."
    assert C.clean_description("- a   b ") == "a b"
    assert C.clean_description("   ") is None
    assert len(C.clean_description("word " * 200)) <= C.MAX_DESCRIPTION_CHARS


def test_openai_source_against_stub(stub_server):
    stub, url = stub_server
    src = C.OpenAIChatSource(url, "tiny-llm", api_key="sk-test", system="be brief")
    out = src.describe_class("red circle", C.CUPL_PROMPTS[2], C.Sampling(n=3, temperature=0.5,
                                                                         max_tokens=20, seed=7))
    assert out == [f"Answer 1.{i} to: What does a red circle look like?" for i in range(3)]
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    b = req["body"]
    assert b["model"] == "tiny-llm" and b["n"] == 3 and b["temperature"] == 0.5
    assert b["max_tokens"] == 20 and b["seed"] == 7
    assert b["messages"][0] == {"role": "system", "content": "be brief"}
    assert "sk-test" not in json.dumps(src.provenance())
    # a server that ignores n is asked again until n answers arrived
    stub.mode, stub.requests[:] = "ignore_n", []
    assert len(src.generate("hi", C.Sampling(n=3))) == 3 and len(stub.requests) == 3
    stub.mode = "error"
    with pytest.raises(C.TextGenerationError, match="500"):
        src.generate("hi", C.Sampling(n=1))
    stub.mode = "malformed"
    with pytest.raises(C.TextGenerationError, match="malformed"):
        src.generate("hi", C.Sampling(n=1))
    with pytest.raises(C.TextGenerationError):
        C.OpenAIChatSource("http://127.0.0.1:9", "m", timeout_s=2).generate("x", C.Sampling(n=1))
    with pytest.raises(ValueError):
        C.OpenAIChatSource("file:///etc/passwd", "m")
    assert C.ServedLMSource(url).provenance()["source"] == "fmrt-lm"


def test_generate_descriptions_with_cache_and_provenance(stub_server, tmp_path):
    stub, url = stub_server
    cache = C.DescriptionCache(str(tmp_path / "cupl"))
    src = C.OpenAIChatSource(url, "tiny-llm")
    s = C.Sampling(n=2)
    ds = C.generate_descriptions(["red circle", "blue star"], src, prompts=C.CUPL_PROMPTS[:2],
                                 sampling=s, cache=cache)
    assert len(stub.requests) == 4 and set(ds.descriptions) == {"red circle", "blue star"}
    assert len(ds.descriptions["red circle"]) == 4
    assert all(r["source"]["model"] == "tiny-llm" and r["sampling"]["n"] == 2
               and not r["cached"] for r in ds.records)
    ds2 = C.generate_descriptions(["red circle", "blue star"], src, prompts=C.CUPL_PROMPTS[:2],
                                  sampling=s, cache=cache)
    assert len(stub.requests) == 4 and ds2.descriptions == ds.descriptions  # all from disk
    assert all(r["cached"] for r in ds2.records) and cache.hits == 4
    files = list((tmp_path / "cupl").rglob("*.json"))
    rec = json.loads(files[0].read_text())
    assert {"class", "prompt", "prompt_text", "source", "sampling", "descriptions"} <= set(rec)
    # other sampling settings are other cache entries
    C.generate_descriptions(["red circle"], src, prompts=C.CUPL_PROMPTS[:1],
                            sampling=C.Sampling(n=2, temperature=0.1), cache=cache)
    assert len(stub.requests) == 5
    p = ds.provenance()
    assert p["records"] == 4 and len(p["prompts"]) == 2
    path = tmp_path / "set.json"
    ds.save(str(path))
    assert C.JsonFileSource(str(path)).describe_class("blue star", None, s) == \
        ds.descriptions["blue star"]


def test_callable_and_json_sources(tmp_path):
    calls = []
    src = C.CallableSource(lambda p, s: calls.append(p) or [p.upper()] * s.n, name="upper")
    ds = C.generate_descriptions(["red"], src, prompts=C.CUPL_PROMPTS[:3],
                                 sampling=C.Sampling(n=2))
    assert len(calls) == 3 and len(ds.descriptions["red"]) == 3  # de-duplicated
    assert ds.records[0]["source"] == {"source": "callable", "name": "upper"}
    with pytest.raises(C.TextGenerationError):
        C.CallableSource(lambda p, s: "not a list").generate("x", C.Sampling())
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"red circle": ["a round red thing", " "], "blue star": ["pointy"]}))
    j = C.JsonFileSource(str(p))
    ds = C.generate_descriptions(["red circle", "blue star"], j)
    assert ds.descriptions == {"red circle": ["a round red thing"], "blue star": ["pointy"]}
    assert len(ds.records) == 2 and ds.records[0]["prompt"] is None
    assert j.provenance()["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(C.TextGenerationError, match="no descriptions"):
        C.generate_descriptions(["green square"], j)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError):
        C.JsonFileSource(str(p))


def test_shapesworld_source():
    classes = class_labels("color_shape") + class_labels("shape") + class_labels("color")
    vocab = set(vocabulary())
    s = C.Sampling(n=4)
    for style in ("prose", "vocab", "mixed"):
        src = C.ShapesWorldSource(style)
        ds = C.generate_descriptions(classes, src, sampling=s)
        assert ds.descriptions == C.generate_descriptions(classes, src, sampling=s).descriptions
        for c, descs in ds.descriptions.items():
            assert len(descs) >= 4
            assert all(c in d for d in descs), (c, descs)
            if style == "vocab":
                assert all(set(tokenize(d)) <= vocab for d in descs), descs
    prose = C.generate_descriptions(["red triangle", "star"], C.ShapesWorldSource("prose"),
                                    sampling=C.Sampling(n=20)).descriptions
    assert any("three" in d and ("sides" in d or "corners" in d) for d in prose["red triangle"])
    assert any("five" in d for d in prose["star"])
    with pytest.raises(C.TextGenerationError, match="not a ShapesWorld class"):
        C.ShapesWorldSource().describe_class("platypus", C.CUPL_PROMPTS[0], s)
    with pytest.raises(ValueError):
        C.ShapesWorldSource("poetry")


# ------------------------------------------------------------------------------- label sets
def _fake_encoder(dim=16):
    def enc(texts):
        out = np.stack([np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16))
                        .normal(size=dim) for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)
    return enc


def test_build_labelset_math_and_modes():
    enc = _fake_encoder()
    t = ["a photo of a {}.", "a {}."]
    d = {"red circle": ["round and red"], "orange star": ["pointy", "orange"]}
    ls = L.build_labelset("x", ["red circle", "orange star"], model="m", encode_text=enc,
                          mode="both", templates=t, descriptions=d)
    texts = ["a photo of an orange star.", "an orange star.", "pointy", "orange"]
    want = enc(texts).mean(0)
    np.testing.assert_allclose(ls.weights("m")[1], want / np.linalg.norm(want), atol=1e-6)
    assert ls.provenance["texts_per_class"] == [3, 4]
    assert np.allclose(np.linalg.norm(ls.weights("m"), axis=1), 1, atol=1e-6)
    only_d = L.build_labelset("x", ["red circle", "orange star"], model="m", encode_text=enc,
                              mode="descriptions", descriptions=d)
    assert only_d.templates == [] and only_d.provenance["texts_per_class"] == [1, 2]
    img = enc(["pointy"])
    p = only_d.classify(img, "m", 100.0)
    assert p.shape == (1, 2) and p[0].argmax() == 1 and abs(p.sum() - 1) < 1e-5
    with pytest.raises(L.LabelSetError, match="not 'other'"):
        ls.weights("other")
    L.build_labelset("x", ["red circle", "orange star"], model="m2", encode_text=enc,
                     mode="both", templates=t, descriptions=d, into=ls)
    assert sorted(ls.embeddings) == ["m", "m2"]


@pytest.mark.parametrize("kw,reason", [
    ({"classes": []}, "non-empty"), ({"classes": ["a"] * 2}, "duplicate"),
    ({"classes": [f"c{i}" for i in range(1001)]}, "at most 1000"),
    ({"classes": ["a", ""]}, "non-empty"), ({"mode": "magic"}, "mode must be"),
    ({"mode": "templates", "templates": ["no placeholder"]}, "containing"),
    ({"mode": "descriptions", "descriptions": None}, "needs descriptions"),
    ({"mode": "descriptions", "descriptions": {"a": ["x"]}}, "no descriptions for classes"),
    ({"mode": "descriptions", "descriptions": {"a": ["x"], "b": ["y"], "zz": ["q"]}},
     "unknown classes"),
    ({"name": "../etc"}, "invalid label set name"),
])
def test_build_labelset_errors(kw, reason):
    args = {"name": "ok", "classes": ["a", "b"], "mode": "templates", "templates": ["{}"]}
    args.update(kw)
    with pytest.raises(L.LabelSetError, match=reason):
        L.build_labelset(args.pop("name"), args.pop("classes"), model="m",
                         encode_text=_fake_encoder(), **args)


def test_store_roundtrip_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRT_LABELSET_DIR", str(tmp_path / "ls"))
    store = L.LabelSetStore()
    assert store.root == str(tmp_path / "ls") and store.names() == []
    enc = _fake_encoder()
    ls = L.build_labelset("shapes", ["red circle", "blue star"], model="shapes-clip",
                          encode_text=enc, mode="templates", templates=["a {}."])
    assert store.save(ls) == 1 and ls.version == 1
    ls2 = L.build_labelset("shapes", ["red circle", "blue star"], model="shapes-clip",
                           encode_text=enc, mode="templates", templates=["{}"])
    assert store.save(ls2) == 2 and store.versions("shapes") == [1, 2]
    got = store.load("shapes")
    assert got.version == 2 and got.templates == ["{}"] and got.classes == ls.classes
    np.testing.assert_array_equal(got.weights("shapes-clip"), ls2.weights("shapes-clip"))
    np.testing.assert_array_equal(store.load("shapes", 1).weights("shapes-clip"),
                                  ls.weights("shapes-clip"))
    assert store.names() == ["shapes"]
    with pytest.raises(L.LabelSetNotFoundError):
        store.load("nope")
    with pytest.raises(L.LabelSetNotFoundError, match="no version 9"):
        store.load("shapes", 9)
    with pytest.raises(L.LabelSetError, match="already exists"):
        store.save(ls, version=1)
    with pytest.raises(L.LabelSetError):
        store.load("../../x")
    monkeypatch.delenv("FMRT_LABELSET_DIR")
    monkeypatch.setenv("FMRT_CACHE_DIR", str(tmp_path / "c"))
    assert L.default_root() == str(tmp_path / "c" / "labelsets")


def test_parse_create_request_and_served_labelsets(tmp_path):
    P = L.parse_create_request
    spec = P({"name": "a", "classes": ["red circle"]})
    assert spec["mode"] == "templates" and spec["templates"] is None
    spec = P({"name": "a", "classes": ["red circle", "star"], "description_source": "shapesworld",
              "samples_per_prompt": 2})
    assert spec["mode"] == "both" and len(spec["descriptions"]["star"]) >= 2
    assert spec["provenance"]["descriptions"]["sources"][0]["source"] == "shapesworld"
    spec2 = P({"name": "a", "classes": ["x"], "descriptions": {"x": ["an x"]},
               "mode": "descriptions"})
    assert spec2["templates"] is None and spec2["provenance"]["descriptions"]["source"] == "inline"
    for body, reason in [
        ({"name": "a", "classes": []}, "non-empty"),
        ({"name": "a", "classes": ["c"] * 2}, "duplicate"),
        ({"name": "a b", "classes": ["c"]}, "invalid"),
        ({"name": "a", "classes": ["c"], "mode": "descriptions"}, "needs"),
        ({"name": "a", "classes": ["c"], "descriptions": {"c": []}}, "non-empty list"),
        ({"name": "a", "classes": ["c"], "descriptions": {}, "description_source": "shapesworld"},
         "not both"),
        ({"name": "a", "classes": ["platypus"], "description_source": "shapesworld"},
         "not a ShapesWorld class"),
        ({"name": "a", "classes": ["c"], "description_source": "gpt-9"}, "unknown"),
        ({"name": "a", "classes": ["c"], "templates": ["x"]}, "containing"),
    ]:
        with pytest.raises(L.LabelSetError, match=reason):
            P(body)

    served = L.ServedLabelSets("m", str(tmp_path))
    enc = _fake_encoder()
    calls = []

    async def aenc(texts):
        calls.append(len(texts))
        return enc(texts)
    ls = asyncio.run(served.create(aenc, name="s", classes=["a", "b"], mode="templates",
                                   templates=["{}", "a {}"], descriptions=None))
    assert calls == [4] and ls.version == 1
    assert served.get("s") is ls  # from memory, no encoding
    fresh = L.ServedLabelSets("m", str(tmp_path))  # another replica: loads from disk
    np.testing.assert_array_equal(fresh.get("s", 1).weights("m"), ls.weights("m"))
    with pytest.raises(L.LabelSetError, match="built for"):
        L.ServedLabelSets("other-model", str(tmp_path)).get("s")
    with pytest.raises(L.LabelSetNotFoundError):
        served.get("missing")


# ------------------------------------------------------------------------------- shapes-clip
@pytest.fixture(scope="module")
def shapes_clip():
    import fmrt

    return fmrt.load("shapes-clip", backend="torch")


def test_labelset_matches_runtime_zero_shot(shapes_clip):
    rt = shapes_clip
    classes = class_labels("color_shape")
    from fmrt.data import TEMPLATES

    ls = L.build_labelset("t", classes, model=rt.name, encode_text=rt.encode_text,
                          mode="templates", templates=list(TEMPLATES))
    np.testing.assert_allclose(ls.weights(rt.name), rt.text_classifier(classes, TEMPLATES),
                               atol=1e-5)


def test_evaluate_cupl_shapesworld(shapes_clip):
    r = C.evaluate_cupl(n=48, rt=shapes_clip, sampling=C.Sampling(n=1), styles=("prose",))
    assert r["classes"] == 24 and r["n"] == 48
    for k in ("templates", "prose_descriptions", "prose_both"):
        assert r[f"{k}_acc"] >= 0.95, (k, r)
        assert 0 < r[f"{k}_margin"] < 2
    cost = C.labelset_cost(rt=shapes_clip, n_images=4, repeats=2, templates=["{}", "a {}."])
    assert cost["texts_encoded_per_request"] == 48 and cost["labelset_ms"] > 0

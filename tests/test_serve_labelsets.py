"""``POST /v1/labelsets`` and ``/v1/classify`` with ``labelset=<name>`` over HTTP: the stored
class embeddings equal ``ClipRuntime``'s zero-shot classifier, a labelset request encodes no
text, and bad label-set requests get 4xx while the server keeps serving.

One Ray + Serve instance (torch backend, two random-weight model directories, a temporary
label-set store) is shared by the module and shut down at the end.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

import fmrt  # noqa: E402
from fmrt.serve.http import encode_image  # noqa: E402
from tests.helpers import make_model_dir, serve_app  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT = 60
CLASSES = ["red circle", "blue square", "green triangle", "orange star"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_labelsets")
    dirs = [make_model_dir(str(root / "tiny-a"), seed=0, logit_scale=50),
            make_model_dir(str(root / "tiny-b"), seed=1)]
    store = str(root / "labelsets")
    with serve_app(
            {"models": dirs, "backend": "torch", "max_batch_size": 32, "batch_wait_timeout_s": 0.01,
             "request_timeout_s": 30, "labelset_dir": store}) as session:
        yield {"url": session.url, "dirs": dirs, "store": store}


@pytest.fixture(scope="module")
def rt_a(server):
    return fmrt.load(server["dirs"][0], backend="torch")


def post(server, path, payload):
    return requests.post(server["url"] + path, json=payload, timeout=TIMEOUT)


def _images(n, seed=0):
    from fmrt.data import ShapesWorld

    imgs, _ = ShapesWorld(image_size=64, seed=seed).classification_set(n, seed=seed)
    return list(imgs)


def _text_items(server, model="tiny-a"):
    r = requests.get(server["url"] + "/v1/models", timeout=TIMEOUT)
    info = next(d for d in r.json()["data"] if d["id"] == model)["info"]
    return info["batching"]["text"]["items"]


def test_create_and_classify_with_templates(server, rt_a):
    templates = ["a photo of a {}.", "a {}."]
    r = post(server, "/v1/labelsets", {"name": "shapes", "model": "tiny-a", "classes": CLASSES,
                                       "templates": templates})
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["object"] == "labelset" and meta["name"] == "shapes" and meta["version"] == 1
    assert meta["classes"] == CLASSES and meta["mode"] == "templates"
    assert meta["models"] == {"tiny-a": {"embed_dim": 128}}
    assert os.path.isfile(os.path.join(server["store"], "shapes", "v1", "labelset.json"))

    imgs = _images(3)
    before = _text_items(server)
    r = post(server, "/v1/classify", {"images": [encode_image(i) for i in imgs],
                                      "labelset": "shapes", "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == CLASSES and body["labelset"] == {"name": "shapes", "version": 1}
    want = rt_a.classify(imgs, CLASSES, templates)
    got = np.array([d["probs"] for d in body["data"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [d["predictions"][0]["label"] for d in body["data"]] == \
        [CLASSES[j] for j in want.argmax(1)]
    assert len(body["data"][0]["predictions"]) == 2
    assert _text_items(server) == before  # no label re-encoding
    # same answer as sending the labels
    r2 = post(server, "/v1/classify", {"images": [encode_image(i) for i in imgs],
                                       "labels": CLASSES, "templates": templates})
    np.testing.assert_allclose(np.array([d["probs"] for d in r2.json()["data"]]), got,
                               atol=1e-5)


def test_descriptions_inline_and_generated_versions(server, rt_a):
    from fmrt.chain.labelsets import build_labelset

    desc = {c: [f"{c} drawn on a plain background.", f"one {c}."] for c in CLASSES}
    r = post(server, "/v1/labelsets", {"name": "desc", "classes": CLASSES,
                                       "descriptions": desc, "mode": "descriptions"})
    assert r.status_code == 201, r.text
    assert r.json()["provenance"]["descriptions"] == {"source": "inline"}
    want = build_labelset("x", CLASSES, model="tiny-a", encode_text=rt_a.encode_text,
                          mode="descriptions", descriptions=desc)
    imgs = _images(2, seed=3)
    probs = want.classify(rt_a.encode_image(imgs), "tiny-a", rt_a.logit_scale)
    r = post(server, "/v1/classify", {"images": [encode_image(i) for i in imgs],
                                      "labelset": "desc"})
    np.testing.assert_allclose([d["probs"] for d in r.json()["data"]], probs, atol=1e-5)

    # ShapesWorld offline descriptions + the model's own templates; re-creating makes v2
    for v in (1, 2):
        r = post(server, "/v1/labelsets", {"name": "cupl", "classes": CLASSES,
                                           "description_source": "shapesworld",
                                           "samples_per_prompt": 2})
        assert r.status_code == 201, r.text
        meta = r.json()
        assert meta["version"] == v and meta["mode"] == "both"
        assert meta["provenance"]["descriptions"]["sources"][0]["source"] == "shapesworld"
        assert min(meta["provenance"]["texts_per_class"]) > 3  # 3 templates + descriptions
    r = post(server, "/v1/classify", {"images": [encode_image(imgs[0])], "labelset": "cupl",
                                      "labelset_version": 1})
    assert r.status_code == 200 and r.json()["labelset"]["version"] == 1


@pytest.mark.parametrize("path,payload,status,match", [
    ("/v1/classify", {"labelset": "nope"}, 404, "no label set named 'nope'"),
    ("/v1/classify", {"labelset": "shapes", "labelset_version": 99}, 404, "no version 99"),
    ("/v1/classify", {"labelset": "shapes", "model": "tiny-b"}, 422, "built for model"),
    ("/v1/classify", {"labelset": "shapes", "labels": ["a"]}, 422, "not both"),
    ("/v1/classify", {"labelset": 3}, 422, "must be a string"),
    ("/v1/classify", {"labelset": "../x"}, 422, "invalid label set name"),
    ("/v1/labelsets", {"name": "e", "classes": []}, 422, "non-empty"),
    ("/v1/labelsets", {"name": "e", "classes": [f"c{i}" for i in range(1001)]}, 422,
     "at most 1000"),
    ("/v1/labelsets", {"name": "e", "classes": ["a", "a"]}, 422, "duplicate"),
    ("/v1/labelsets", {"name": "bad name", "classes": ["a"]}, 422, "invalid label set name"),
    ("/v1/labelsets", {"name": "e", "classes": ["a"], "mode": "descriptions"}, 422, "needs"),
    ("/v1/labelsets", {"name": "e", "classes": ["platypus"], "description_source": "shapesworld"},
     422, "not a ShapesWorld class"),
    ("/v1/labelsets", {"name": "e", "classes": ["a"], "model": "tiny-z"}, 404, "not served"),
    ("/v1/labelsets", {"name": "e", "classes": ["a"], "colour": 1}, 422, "unknown field"),
])
def test_bad_labelset_requests_are_4xx(server, path, payload, status, match):
    if path == "/v1/classify":
        payload = dict(payload, images=[encode_image(_images(1)[0])])
        if payload.get("labelset") == "shapes":  # created by the first test (module order)
            post(server, "/v1/labelsets", {"name": "shapes", "model": "tiny-a",
                                           "classes": CLASSES, "templates": ["{}"]})
    r = post(server, path, payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"], err
    assert requests.get(server["url"] + "/healthz", timeout=TIMEOUT).status_code == 200

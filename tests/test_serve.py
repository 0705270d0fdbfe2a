"""Ray Serve app over HTTP: every route, equality with ``ClipRuntime``, dynamic batching, and
every class of bad input -> 4xx JSON error (the server keeps serving afterwards).

One Ray + Serve instance (torch backend, two random-weight model directories) is shared by the
module and shut down at the end.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import struct
import sys
import threading
import zlib

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

LIMITS = {"max_image_bytes": 1_000_000, "max_body_bytes": 3_000_000}
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_models")
    dirs = [make_model_dir(str(root / "tiny-a"), seed=0),
            make_model_dir(str(root / "tiny-b"), seed=1, family="coca")]
    with serve_app(
            {"models": dirs, "backend": "torch", "max_batch_size": 32, "batch_wait_timeout_s": 0.02,
             "limits": LIMITS, "request_timeout_s": 30}) as session:
        yield {"url": session.url, "dirs": dirs}


@pytest.fixture(scope="module")
def runtimes(server):
    return {os.path.basename(d): fmrt.load(d, backend="torch") for d in server["dirs"]}


def post(server, path, payload=None, **kw):
    kw.setdefault("timeout", TIMEOUT)
    if payload is not None:
        kw["json"] = payload
    return requests.post(server["url"] + path, **kw)


def get(server, path):
    return requests.get(server["url"] + path, timeout=TIMEOUT)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(48 + 8 * i, 80 - 4 * i, 3), dtype=np.uint8)
            for i in range(n)]


def _png_header(w: int, h: int) -> str:
    """A PNG with a valid IHDR claiming ``w x h`` and no pixel data: only a header check can
    reject it as too large (decoding it would fail as a corrupt image instead)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


# ---------------------------------------------------------------------------------- happy paths
def test_health_and_models(server):
    r = get(server, "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = get(server, "/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["id"] for d in data] == ["tiny-a", "tiny-b"]
    assert data[0]["default"] and not data[1]["default"]
    info = data[0]["info"]
    assert info["family"] == "clip" and info["embed_dim"] == 128 and info["backend"] == "torch"
    assert info["max_batch_size"] == 32


def test_embeddings_match_runtime(server, runtimes):
    texts = ["a red circle", "large blue square", "a photo of a small green triangle"]
    imgs = _images(3)
    for name in ("tiny-a", "tiny-b"):
        rt = runtimes[name]
        r = post(server, "/v1/embeddings", {"model": name, "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name and body["dim"] == 128 and body["input_type"] == "text"
        got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
        np.testing.assert_allclose(got, rt.encode_text(texts), atol=1e-5, rtol=0)
        r = post(server, "/v1/embeddings",
                 {"model": name, "images": [encode_image(imgs[0]),
                                            encode_image(imgs[1], data_url=False),
                                            encode_image(imgs[2])]})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, rt.encode_image(imgs), atol=1e-5, rtol=0)
    # default model = first; a single string is accepted; base64 float32 encoding
    r = post(server, "/v1/embeddings", {"input": "a red circle", "encoding_format": "base64"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-a"
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, runtimes["tiny-a"].encode_text(["a red circle"])[0],
                               atol=1e-5, rtol=0)


def test_classify(server, runtimes):
    imgs = _images(2, seed=1)
    labels = ["red circle", "blue square", "green triangle"]
    templates = ["a photo of a {}", "{}"]
    r = post(server, "/v1/classify", {"model": "tiny-b", "images": [encode_image(i) for i in imgs],
                                      "labels": labels, "templates": templates, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == labels and len(body["data"]) == 2
    want = runtimes["tiny-b"].classify(imgs, labels, templates)
    for i, d in enumerate(body["data"]):
        np.testing.assert_allclose(d["probs"], want[i], atol=1e-5, rtol=0)
        preds = d["predictions"]
        assert len(preds) == 2 and preds[0]["prob"] >= preds[1]["prob"]
        assert preds[0]["label"] == labels[int(np.argmax(want[i]))]


def test_rank_text_to_images_and_image_to_texts(server, runtimes):
    rt = runtimes["tiny-a"]
    imgs = _images(4, seed=2)
    r = post(server, "/v1/rank", {"query": "a red circle",
                                  "images": [encode_image(i) for i in imgs]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query_type"] == "text" and body["candidate_type"] == "image"
    want = rt.encode_image(imgs) @ rt.encode_text(["a red circle"])[0]
    np.testing.assert_allclose(body["scores"], want, atol=1e-5, rtol=0)
    assert [d["index"] for d in body["data"]] == list(np.argsort(-want, kind="stable"))

    cands = ["red circle", "blue square", "green triangle"]
    r = post(server, "/v1/rank", {"query_image": encode_image(imgs[0]), "candidates": cands,
                                  "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    want = rt.encode_text(cands) @ rt.encode_image(imgs[:1])[0]
    np.testing.assert_allclose(body["scores"], want, atol=1e-5, rtol=0)
    assert len(body["data"]) == 2 and body["data"][0]["text"] == cands[int(np.argmax(want))]


# ---------------------------------------------------------------------------------- batching
def test_captions(server, runtimes):
    imgs = _images(2)
    r = post(server, "/v1/captions", {"model": "tiny-b", "max_length": 6,
                                      "images": [encode_image(im) for im in imgs]})
    assert r.status_code == 200, r.text
    caps = [d["caption"] for d in r.json()["data"]]
    assert caps == runtimes["tiny-b"].generate_caption(imgs, max_length=6)
    # a CLIP model has no caption decoder: a 4xx naming the problem, not a 500
    r = post(server, "/v1/captions", {"model": "tiny-a", "images": [encode_image(imgs[0])]})
    assert r.status_code == 422 and "cannot caption" in r.json()["error"]["message"]


def test_concurrent_requests_are_batched(server, runtimes):
    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "small")
             for s in ("circle", "square", "triangle", "photo")]  # 16 distinct
    want = runtimes["tiny-a"].encode_text(texts)
    img = encode_image(_images(1, seed=3)[0])
    before = get(server, "/v1/models").json()["data"][0]["info"]["batching"]
    n = 16
    for _ in range(3):  # the replica may answer a round too fast to batch; rarely needs a retry
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait(timeout=30)
            if i % 4 == 3:
                return i, post(server, "/v1/embeddings", {"images": [img]})
            return i, post(server, "/v1/embeddings", {"input": [texts[i]]})

        with cf.ThreadPoolExecutor(n) as ex:
            results = list(ex.map(one, range(n)))
        for i, r in results:
            assert r.status_code == 200, r.text
            if i % 4 != 3:
                np.testing.assert_allclose(r.json()["data"][0]["embedding"], want[i], atol=1e-5,
                                           rtol=0)
        after = get(server, "/v1/models").json()["data"][0]["info"]["batching"]
        if after["text"]["max_requests"] > 1:
            break
    assert after["text"]["requests"] - before["text"]["requests"] >= 12
    assert after["text"]["max_requests"] > 1, after  # several requests shared one batch
    assert after["text"]["batches"] - before["text"]["batches"] < \
        after["text"]["requests"] - before["text"]["requests"]


def test_bad_request_does_not_fail_its_batch(server, runtimes):
    """Through the handle (no ingress): a bad image array is rejected for its own request while
    concurrent good requests to the same encoder succeed."""
    from ray import serve

    h = serve.get_deployment_handle("ClipEncoder-tiny-a", app_name="fmrt")
    good = _images(2, seed=4)
    bad = [np.zeros((8, 8, 3), dtype=np.float32)]
    resps = [h.embed_images.remote(good), h.embed_images.remote(bad),
             h.embed_images.remote(good[:1])]
    out0 = resps[0].result(timeout_s=TIMEOUT)
    np.testing.assert_allclose(out0, runtimes["tiny-a"].encode_image(good), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="dtype uint8"):
        resps[1].result(timeout_s=TIMEOUT)
    assert resps[2].result(timeout_s=TIMEOUT).shape == (1, 128)


# ---------------------------------------------------------------------------------- bad input
def _bad_cases():
    ok_img = encode_image(_images(1)[0])
    png = base64.b64decode(ok_img.split(",", 1)[1])
    big_b64 = "A" * (LIMITS["max_image_bytes"] + 4)
    return [
        # (name, method, path, kwargs, status, error type)
        ("malformed json", "post", "/v1/embeddings", {"data": b"{not json"}, 400, "invalid_json"),
        ("empty body", "post", "/v1/embeddings", {"data": b""}, 400, "invalid_json"),
        ("not an object", "post", "/v1/embeddings", {"json": ["a"]}, 422, "invalid_request"),
        ("neither input", "post", "/v1/embeddings", {"json": {}}, 422, "invalid_request"),
        ("both inputs", "post", "/v1/embeddings",
         {"json": {"input": ["a"], "images": [ok_img]}}, 422, "invalid_request"),
        ("wrong type", "post", "/v1/embeddings", {"json": {"input": 5}}, 422, "invalid_request"),
        ("non-string item", "post", "/v1/embeddings", {"json": {"input": ["a", 3]}}, 422,
         "invalid_request"),
        ("unknown field", "post", "/v1/embeddings", {"json": {"input": ["a"], "foo": 1}}, 422,
         "invalid_request"),
        ("image not a string", "post", "/v1/embeddings", {"json": {"images": [[1, 2]]}}, 422,
         "invalid_request"),
        ("bad base64", "post", "/v1/embeddings", {"json": {"images": ["@@@not base64@@@"]}},
         400, "invalid_image"),
        ("not an image", "post", "/v1/embeddings",
         {"json": {"images": [base64.b64encode(b"hello, world!").decode()]}}, 400,
         "invalid_image"),
        ("truncated png", "post", "/v1/embeddings",
         {"json": {"images": [base64.b64encode(png[: len(png) // 2]).decode()]}}, 400,
         "invalid_image"),
        ("non-image data url", "post", "/v1/embeddings",
         {"json": {"images": ["data:text/plain;base64,aGVsbG8="]}}, 400, "invalid_image"),
        ("side too large", "post", "/v1/embeddings",
         {"json": {"images": [_png_header(9000, 10)]}}, 413, "payload_too_large"),
        ("too many pixels", "post", "/v1/embeddings",
         {"json": {"images": [_png_header(7000, 7000)]}}, 413, "payload_too_large"),
        ("decompression bomb", "post", "/v1/embeddings",
         {"json": {"images": [_png_header(100000, 100000)]}}, 413, "payload_too_large"),
        ("base64 too large", "post", "/v1/embeddings", {"json": {"images": [big_b64]}}, 413,
         "payload_too_large"),
        ("body too large", "post", "/v1/embeddings",
         {"json": {"input": ["a" * 1000] * 3100}}, 413, "payload_too_large"),
        ("empty labels", "post", "/v1/classify", {"json": {"images": [ok_img], "labels": []}},
         422, "invalid_request"),
        ("too many labels", "post", "/v1/classify",
         {"json": {"images": [ok_img], "labels": [f"l{i}" for i in range(1001)]}}, 422,
         "invalid_request"),
        ("missing labels", "post", "/v1/classify", {"json": {"images": [ok_img]}}, 422,
         "invalid_request"),
        ("template without {}", "post", "/v1/classify",
         {"json": {"images": [ok_img], "labels": ["a"], "templates": ["photo"]}}, 422,
         "invalid_request"),
        ("rank without query", "post", "/v1/rank", {"json": {"candidates": ["a"]}}, 422,
         "invalid_request"),
        ("unknown model", "post", "/v1/embeddings", {"json": {"model": "nope", "input": ["a"]}},
         404, "model_not_found"),
        ("unknown route", "post", "/v1/nothing", {"json": {}}, 404, "not_found"),
        ("wrong method", "get", "/v1/embeddings", {}, 405, "method_not_allowed"),
    ]


def test_bad_inputs_are_4xx_and_server_keeps_serving(server):
    failures = []
    for name, method, path, kw, status, etype in _bad_cases():
        r = getattr(requests, method)(server["url"] + path, timeout=TIMEOUT, **kw)
        try:
            err = r.json()["error"]
            ok = (r.status_code == status and err["type"] == etype and err["message"])
        except Exception:
            ok, err = False, r.text[:200]
        if not ok:
            failures.append(f"{name}: got {r.status_code} {err}, want {status} {etype}")
    assert not failures, "\n".join(failures)
    r = post(server, "/v1/embeddings", {"input": ["a red circle"]})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 128
    assert get(server, "/healthz").status_code == 200


def test_replica_errors_map_to_http():
    from ray.exceptions import RayTaskError

    from fmrt.runtime.clip import ClassifyInputError
    from fmrt.serve.app import map_exception

    wrapped = RayTaskError("classify", "traceback", ClassifyInputError("need 1 to 1000 labels"))
    err = map_exception(wrapped.as_instanceof_cause())
    assert (err.status, err.type) == (422, "invalid_request") and "labels" in err.message
    err = map_exception(RuntimeError("boom"))
    assert err.status == 500 and "RuntimeError: boom" in err.message


def test_launcher_uses_private_auth_token(server):
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    assert os.path.basename(os.path.dirname(path)).startswith("fmrt-ray-auth-")
    assert os.path.isfile(path) and len(open(path).read().strip()) == 64


# ---------------------------------------------------------------------------------- config
def test_config_yaml_builds(server):
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from fmrt.serve import CONFIG_PATH
    from fmrt.serve.app import AppArgs, build_app
    from ray.serve import Application

    with open(CONFIG_PATH) as f:
        cfg = yaml.safe_load(f)
    ServeDeploySchema.model_validate(cfg)
    app_cfg = cfg["applications"][0]
    assert app_cfg["import_path"] == "fmrt.serve.app:build_app"
    args = dict(app_cfg["args"], models=",".join(server["dirs"]), backend="torch")
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(app, Application)
    with pytest.raises(Exception):
        AppArgs(models=["x"], max_batch_size=0)

"""VLMs over Ray Serve (``fmrt.serve.vlm``) behind ``POST /v1/chat/completions`` on loopback
HTTP: answers equal the in-process facade (non-streaming, SSE streaming, the official ``openai``
client), concurrent requests share one batched generation, a client that disconnects mid-stream
frees its batch row, ``"model"`` selection, and every bad input -> 4xx with a message.

One Ray + Serve instance (the app's default backend: onnxruntime when importable, answers
compared with the torch facade) is shared by the module and shut down at the end. It
serves the bundled ``shapes-flamingo`` (the default VLM) and ``long-flamingo``: the same
architecture with random weights and a 2048-token context, which never emits a stop token, so
its streams last as long as ``max_tokens`` asks (what the batching and disconnect tests need).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

import fmrt  # noqa: E402
from fmrt.serve.http import encode_image  # noqa: E402
from tests.helpers import serve_app  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT = 60
LONG = "long-flamingo"
LONG_CONTEXT = 2048


def make_long_vlm(directory: str, context: int = LONG_CONTEXT, seed: int = 0) -> str:
    """``shapes-flamingo``'s architecture and tokenizer with random weights and a longer
    context: greedy decoding never produces a stop token (it generates ``max_tokens``)."""
    import torch

    from fmrt.pretrained import build_from_config, load_pretrained, read_config, save_pretrained

    p = load_pretrained("shapes-flamingo")
    cfg = read_config("shapes-flamingo")["config"]
    cfg["lm"]["max_position_embeddings"] = int(context)
    torch.manual_seed(seed)
    model = build_from_config("flamingo", cfg)
    return save_pretrained(directory, family="flamingo", model=model, config=cfg,
                           preprocess=p.preprocess, tokenizer=p.tokenizer)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    long_dir = make_long_vlm(str(tmp_path_factory.mktemp("vlm") / LONG))
    with serve_app(
            {"models": ["shapes-flamingo", long_dir], "backend": None, "vlm_max_batch_size": 8,
             "vlm_batch_wait_timeout_s": 0.1, "request_timeout_s": 60, "num_threads": 1,
             "access_log": False}) as session:
        yield {"url": session.url, "long_dir": long_dir}


@pytest.fixture(scope="module")
def vlm():
    return fmrt.load("shapes-flamingo", backend="torch")


def _scene(seed=0, side=64):
    from fmrt.data import ShapesWorld

    imgs, _ = ShapesWorld(image_size=side, seed=seed).classification_set(1, seed=seed)
    return np.asarray(imgs[0], np.uint8)


QUESTIONS = ["what color is the square?", "how many circles are there?", "what shape is red?",
             "is there a triangle?", "how many shapes are there?", "what color is the circle?",
             "what shape is blue?", "how many squares are there?"]


def _messages(img, text):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": encode_image(img)}},
        {"type": "text", "text": text}]}]


def _local_messages(img, text):
    return [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": text}]}]


def post(server, payload, **kw):
    return requests.post(server["url"] + "/v1/chat/completions", json=payload,
                         timeout=TIMEOUT, **kw)


def stats(server, model):
    r = requests.get(server["url"] + "/v1/vlm/stats", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["models"][model]["batching"]


def sse_events(resp):
    """Events of an SSE response as they arrive: parsed JSON dicts, and the string "[DONE]"."""
    buf = b""
    for data in resp.iter_content(chunk_size=None):
        buf += data
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            assert block.startswith(b"data: "), block
            block = block[len(b"data: "):]
            yield "[DONE]" if block == b"[DONE]" else json.loads(block)
    assert buf == b"", buf  # nothing after the last event


def read_sse(resp):
    return list(sse_events(resp))


# ------------------------------------------------------------------------------------ basics
def test_models_and_health(server):
    from fmrt.serve.app import default_backend

    r = requests.get(server["url"] + "/v1/models", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    by_id = {m["id"]: m for m in r.json()["data"]}
    assert by_id["shapes-flamingo"]["family"] == "flamingo" and by_id["shapes-flamingo"]["default"]
    assert not by_id[LONG]["default"]
    info = by_id[LONG]["info"]
    assert info["context_length"] == LONG_CONTEXT and info["max_images"] >= 1
    assert info["backend"] == default_backend() and info["max_batch_size"] == 8
    assert requests.get(server["url"] + "/healthz", timeout=TIMEOUT).json()["status"] == "ok"


def test_chat_matches_facade(server, vlm):
    img = _scene(0, side=80)  # any size: resized by the model, points map back to 80x80
    for q in QUESTIONS[:3]:
        r = post(server, {"model": "shapes-flamingo", "messages": _messages(img, q),
                          "max_tokens": 16})
        assert r.status_code == 200, r.text
        body = r.json()
        want = vlm.chat(_local_messages(img, q), max_new_tokens=16)
        assert body["object"] == "chat.completion" and body["model"] == "shapes-flamingo"
        ch = body["choices"][0]
        assert ch["message"]["role"] == "assistant" and ch["message"]["content"] == want
        assert ch["finish_reason"] in ("stop", "length")
        u = body["usage"]
        assert u["prompt_tokens"] > 1 and u["completion_tokens"] >= 1
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_default_model_and_selection(server):
    img = _scene(1)
    r = post(server, {"messages": _messages(img, QUESTIONS[0]), "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "shapes-flamingo"  # no "model": the default (first) VLM
    r = post(server, {"model": LONG, "messages": _messages(img, "hi"), "max_tokens": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == LONG
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7


def test_streaming_sse(server, vlm):
    img = _scene(2)
    q = QUESTIONS[1]
    r = post(server, {"messages": _messages(img, q), "max_tokens": 16, "stream": True,
                      "stream_options": {"include_usage": True}}, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == vlm.chat(_local_messages(img, q), max_new_tokens=16)

    # a long stream arrives piece by piece (one piece per decode step)
    r = post(server, {"model": LONG, "messages": _messages(img, "hi"), "max_tokens": 40,
                      "stream": True}, stream=True)
    assert r.status_code == 200
    chunks = [e for e in read_sse(r) if e != "[DONE]"]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(pieces) >= 20 and all(pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_pointing_answer_structured(server):
    """A response whose text has point tags carries them as structured data; the fields are
    consistent with the text whatever the model answered."""
    from fmrt.data import parse_point_answer

    img = _scene(3, side=96)
    r = post(server, {"messages": _messages(img, "point to the circles"), "max_tokens": 64})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    if "<point" in msg["content"] or "total of" in msg["content"]:
        pts, count = parse_point_answer(msg["content"])
        assert msg["count"] == count
        assert [[p["x"], p["y"]] for p in msg["points"]] == np.asarray(pts).reshape(-1, 2
                                                                                   ).tolist()
    else:
        assert "points" not in msg


def test_openai_client(server, vlm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0,
                           timeout=TIMEOUT)
    img = _scene(4)
    q = QUESTIONS[0]
    want = vlm.chat(_local_messages(img, q), max_new_tokens=16)
    out = client.chat.completions.create(model="shapes-flamingo", messages=_messages(img, q),
                                         max_tokens=16, temperature=0.0)
    assert out.choices[0].message.content == want
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.chat.completions.create(model="shapes-flamingo", messages=_messages(img, q),
                                            max_tokens=16, stream=True)
    pieces, finish = [], None
    for c in stream:
        assert c.object == "chat.completion.chunk"
        if c.choices:
            pieces.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    assert "".join(pieces) == want and finish in ("stop", "length")
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="nope", messages=_messages(img, q))
    with pytest.raises(openai.APIStatusError, match="temperature"):
        client.chat.completions.create(model="shapes-flamingo", messages=_messages(img, q),
                                       temperature=3.0)
    ids = [m.id for m in client.models.list()]
    assert "shapes-flamingo" in ids and LONG in ids


# ------------------------------------------------------------------------------------ batching
def test_concurrent_requests_are_batched(server, vlm):
    before = stats(server, "shapes-flamingo")
    imgs = [_scene(10 + i) for i in range(8)]

    def one(i):
        return post(server, {"messages": _messages(imgs[i], QUESTIONS[i]), "max_tokens": 16})

    with cf.ThreadPoolExecutor(8) as ex:
        res = list(ex.map(one, range(8)))
    assert all(r.status_code == 200 for r in res), [r.text for r in res]
    after = stats(server, "shapes-flamingo")
    assert after["max_batch"] > 1
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # fewer generation runs than requests
    # a batched answer equals the answer of the request alone
    for i, r in enumerate(res):
        assert r.json()["choices"][0]["message"]["content"] == vlm.chat(
            _local_messages(imgs[i], QUESTIONS[i]), max_new_tokens=16)


def test_concurrent_streams_share_one_run(server):
    before = stats(server, LONG)
    img = _scene(5)

    def one(i):
        r = post(server, {"model": LONG, "messages": _messages(img, QUESTIONS[i]),
                          "max_tokens": 24, "stream": True}, stream=True)
        return r.status_code, read_sse(r)

    with cf.ThreadPoolExecutor(4) as ex:
        res = list(ex.map(one, range(4)))
    for status, events in res:
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    after = stats(server, LONG)
    assert after["batches"] - before["batches"] < 4 and after["max_batch"] > 1
    assert after["completion_tokens"] - before["completion_tokens"] == 4 * 24


def test_disconnected_stream_frees_its_slot(server):
    before = stats(server, LONG)
    img = _scene(6)
    max_tokens = LONG_CONTEXT - 64  # ~30 s of decoding if nobody stopped it
    r = post(server, {"model": LONG, "messages": _messages(img, "hi"), "max_tokens": max_tokens,
                      "stream": True}, stream=True)
    assert r.status_code == 200
    it = sse_events(r)
    got = [next(it) for _ in range(4)]  # the role chunk and 3 text pieces
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(g["choices"][0]["delta"]["content"] for g in got[1:])
    st = stats(server, LONG)
    assert st["active_rows"] == 1
    r.close()  # the client goes away mid-stream
    t0 = time.time()
    while time.time() - t0 < 10:
        st = stats(server, LONG)
        if st["active_rows"] == 0 and st["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert st["active_rows"] == 0 and st["active_runs"] == 0, st
    assert st["cancelled"] == before["cancelled"] + 1
    assert st["completed"] == before["completed"]
    # the model is free: a new request is answered at once, not after ~2000 decode steps
    t0 = time.time()
    r = post(server, {"model": LONG, "messages": _messages(img, "hi"), "max_tokens": 4})
    assert r.status_code == 200 and time.time() - t0 < 5


def test_handle_answer_and_point(server, vlm):
    from ray import serve

    h = serve.get_deployment_handle("VlmServer-shapes-flamingo", "fmrt")
    img = _scene(7)
    assert h.answer.remote([img], QUESTIONS[0], 8).result() == vlm.generate(
        [img], QUESTIONS[0], max_new_tokens=8)
    out = h.point.remote(img, "circles").result()
    assert out == vlm.point(img, "circles")
    # a raw OpenAI body through the handle (data URL decoded in the replica)
    body = {"messages": _messages(img, QUESTIONS[1]), "max_tokens": 8}
    assert h.chat.remote(body).result()["choices"][0]["message"]["content"] == vlm.chat(
        _local_messages(img, QUESTIONS[1]), max_new_tokens=8)


# ------------------------------------------------------------------------------------ 4xx
def test_bad_requests(server):
    img = _scene(8)
    ok = _messages(img, "what color is the square?")
    url = encode_image(img)
    cases = [
        # (payload or raw bytes, status, substring of the message)
        (b"{not json", 400, "malformed JSON"),
        ({"model": "nope", "messages": ok}, 404, "not served"),
        ({"messages": []}, 422, "messages"),
        ({}, 422, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
        ({"messages": [{"role": "user", "content": ""}]}, 422, "must not be empty"),
        ({"messages": [{"role": "user", "content": []}]}, 422, "must not be empty"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 422,
         "content"),
        ({"messages": ok + [{"role": "assistant", "content": "red"}]}, 422, "last message"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url",
                                                       "image_url": {"url": url}}]},
                       *ok]}, 422, "only user messages may hold images"),
        ({"messages": ok, "max_tokens": 0}, 422, "max_tokens"),
        ({"messages": ok, "max_tokens": -3}, 422, "max_tokens"),
        ({"messages": ok, "max_tokens": 10 ** 9}, 422, "max_tokens"),
        ({"messages": ok, "max_tokens": "8"}, 422, "max_tokens"),
        ({"messages": ok, "max_completion_tokens": 0}, 422, "max_completion_tokens"),
        ({"messages": ok, "temperature": -0.1}, 422, "temperature"),
        ({"messages": ok, "temperature": 2.5}, 422, "temperature"),
        ({"messages": ok, "top_p": 0}, 422, "top_p"),
        ({"messages": ok, "n": 2}, 422, "n"),
        ({"messages": ok, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"messages": ok, "tools": []}, 422, "tools"),
        ({"messages": ok, "stream": "yes"}, 422, "stream"),
        # images
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}] * 9 + [
            {"type": "text", "text": "how many circles?"}]}]}, 413, "at most 8"),
        ({"messages": _messages_url("data:image/png;base64,AAAAAAAA")}, 400, "image"),
        ({"messages": _messages_url("data:text/plain;base64,aGVsbG8=")}, 400, "not an image"),
        ({"messages": _messages_url("data:image/png,rawbytes")}, 400, "base64"),
        ({"messages": _messages_url("%%% not base64 %%%")}, 400, "base64"),
        ({"messages": _messages_url("https://example.com/cat.png")}, 400, "not fetched"),
        # prompt size
        ({"messages": ok, "max_tokens": 250}, 400, "context length"),
        ({"messages": _messages(img, " ".join(["circle"] * 400))}, 400, "context length"),
        ({"messages": _messages(img, "x" * 5000)}, 413, "characters"),
    ]
    for payload, status, needle in cases:
        for stream in (False, True):
            if isinstance(payload, bytes):
                r = requests.post(server["url"] + "/v1/chat/completions", data=payload,
                                  headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
            else:
                p = dict(payload, stream=stream) if stream and "stream" not in payload \
                    else payload
                r = post(server, p)
            assert r.status_code == status, (payload if isinstance(payload, bytes) else
                                             {k: v for k, v in payload.items()
                                              if k != "messages"}, stream, r.text[:300])
            err = r.json()["error"]
            assert needle.lower() in err["message"].lower(), (needle, err)
            assert err["code"] == status
            if isinstance(payload, bytes):
                break
    # nothing above reached a generation run
    assert stats(server, "shapes-flamingo")["failed"] == 0


def _messages_url(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "what is it?"}]}]


def test_parse_chat_request_units():
    """The ingress validation on its own (no Ray)."""
    from fmrt.serve import http as H
    from fmrt.serve.vlm import chunk, parse_chat_request, sse

    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "stop": "x",
                              "max_completion_tokens": 5, "temperature": 1})
    assert req.new_tokens() == 5 and req.stop_list() == ["x"] and req.temperature == 1
    with pytest.raises(H.HTTPError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                            "max_completion_tokens": 5})
    assert e.value.status == 422
    with pytest.raises(H.HTTPError) as e:
        parse_chat_request({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}] * 3}]},
            H.ServeLimits(max_images=2))
    assert e.value.status == 413
    ev = sse(chunk("id", 1, "m", {"content": "a\nb"}))
    assert ev.startswith(b"data: {") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2

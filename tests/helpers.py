"""Shared test helpers: tiny random-weight model directories in fmrt's format."""
from __future__ import annotations

import os

import numpy as np
import torch


def make_model_dir(path: str, *, family: str = "clip", seed: int = 0,
                   logit_scale: float | None = None) -> str:
    """Write a random-init ShapesWorld-sized model (clip or coca) with the real tokenizer;
    ``logit_scale`` (e.g. 50) overrides the initial 1/0.07 to make probabilities peaky."""
    import fmrt
    from fmrt.pretrained import save_pretrained
    from fmrt.train.contrastive import SHAPES_MEAN, SHAPES_STD, build_tokenizer
    from fmrt.preprocess import PreprocessConfig
    from fmrt.data import TEMPLATES

    torch.manual_seed(seed)
    arch = "shapes-coca-tiny" if family == "coca" else "shapes-vit-tiny"
    m = fmrt.create_model(arch).eval()
    if logit_scale is not None:
        with torch.no_grad():
            m.logit_scale.fill_(float(np.log(logit_scale)))
    tk = build_tokenizer(m.context_length)
    pre = PreprocessConfig(image_size=64, mean=SHAPES_MEAN, std=SHAPES_STD, resize_mode="squash",
                           interpolation="bilinear")
    os.makedirs(path, exist_ok=True)
    return save_pretrained(path, family=family, model=m, config=m.config.to_dict(),
                           preprocess=pre, tokenizer=tk,
                           extra={"zero_shot_templates": list(TEMPLATES[:3])})


def segment_anything_root() -> "str | None":
    """Directory of the installed ``segment_anything`` package (test extra), or None.

    Searched on ``sys.path`` without importing it and without consulting ``sys.modules``: its
    ``__init__`` imports torchvision (absent by design), and tests register stub or
    partially-imported ``segment_anything`` packages, whose missing ``__spec__`` makes
    ``importlib.util.find_spec`` raise."""
    import importlib.machinery

    spec = importlib.machinery.PathFinder.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def serve_app(app_args: dict):
    """Start one Serve application (``fmrt.serve.launcher.start_serve``) on a free loopback
    port for a test module, and shut Ray down after it: use as a module-scoped fixture body,
    ``with serve_app({...}) as session: yield {"url": session.url, ...}``. The launcher starts Ray
    with node IP 127.0.0.1, dashboard off and an auth-token file in a temp dir, and puts the repo
    on the replicas' ``PYTHONPATH`` so they import test modules."""
    import contextlib

    from fmrt.serve.launcher import free_port, start_serve

    @contextlib.contextmanager
    def _session():
        session = start_serve(app_args, host="127.0.0.1", port=free_port(),
                              ray_kwargs={"log_to_driver": False})
        try:
            yield session
        finally:
            session.shutdown()

    return _session()


def json_stub_server(respond):
    """A local HTTP server on a free loopback port for tests of HTTP clients (OpenAI-compatible
    endpoints and the like): every POST's JSON body goes to ``respond(path, body, headers)``,
    which returns ``(status, payload)`` (``payload``: a JSON-able object, or bytes sent as they
    are). Use as ``with json_stub_server(fn) as base_url:`` (``http://127.0.0.1:<port>``)."""
    import contextlib
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = respond(self.path, body, self.headers)
            out = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    @contextlib.contextmanager
    def _serve():
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{srv.server_address[1]}"
        finally:
            srv.shutdown()
            srv.server_close()

    return _serve()

"""Ray Serve deployment of fmrt models over HTTP.

* ``fmrt.serve.app``: deployments (``ClipEncoder``, ``Ingress``), ``AppArgs`` and ``build_app``
* ``fmrt.serve.http``: request parsing/validation, image decoding, error responses (no Ray)
* ``fmrt.serve.sam`` / ``fmrt.serve.vlm``: SAM and VLM deployments + routes (VLMs: OpenAI-style
  ``POST /v1/chat/completions``, batched generation, SSE streaming)
* ``fmrt.serve.launcher``: ``serve_main`` (``fmrt serve``): start Ray + Serve locally
* ``fmrt/serve/config.yaml``: a Serve config file (``serve run fmrt/serve/config.yaml``)

Names are imported lazily so that ``import fmrt.serve`` does not import Ray.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

_EXPORTS = {
    "AppArgs": "fmrt.serve.app", "build_app": "fmrt.serve.app",
    "build_app_from_args": "fmrt.serve.app", "ClipEncoder": "fmrt.serve.app",
    "Ingress": "fmrt.serve.app", "FamilyRoutes": "fmrt.serve.app",
    "register_family_routes": "fmrt.serve.app",
    "VlmServer": "fmrt.serve.vlm", "VlmRoutes": "fmrt.serve.vlm",
    "ServeLimits": "fmrt.serve.http", "HTTPError": "fmrt.serve.http",
    "encode_image": "fmrt.serve.http",
    "serve_main": "fmrt.serve.launcher", "start_serve": "fmrt.serve.launcher",
    "start_ray": "fmrt.serve.launcher", "ServeSession": "fmrt.serve.launcher",
}
CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fmrt.serve' has no attribute {name!r}")


__all__ = sorted(_EXPORTS) + ["CONFIG_PATH"]

"""HTTP request parsing and validation for the serving app, independent of Ray.

Everything a client can get wrong is checked here, in the ingress, before any work reaches a model
replica, and is reported as an ``HTTPError`` that ``error_response`` turns into
``{"error": {"message": ..., "type": ...}}`` with a fitting 4xx status:

* 400 ``invalid_json``: the body is not JSON; 400 ``invalid_image``: bad base64, bytes that are
  not an image, a truncated or corrupt image;
* 404 ``model_not_found`` / ``not_found``; 405 ``method_not_allowed``;
* 413 ``payload_too_large``: body, one image's base64 payload, an image's width/height/pixel count
  (read from the header with Pillow *before* the pixels are decoded), too many inputs;
* 422 ``invalid_request``: valid JSON of the wrong shape (missing fields, wrong types, empty or
  more than 1000 labels, ...).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from fmrt.preprocess import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

try:  # the labels cap of the CLIP facade; keep one number
    from fmrt.runtime.clip import MAX_LABELS
except Exception:  # pragma: no cover
    MAX_LABELS = 1000


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits enforced by the ingress (override with ``AppArgs.limits``)."""

    max_body_bytes: int = 32 * 1024 * 1024  # whole JSON body
    max_image_bytes: int = 12 * 1024 * 1024  # one image's base64 string (~9 MB of file)
    max_image_side: int = MAX_IMAGE_SIDE  # decoded width or height
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoded width * height
    max_images: int = 64  # images per request (embeddings, classify, rank candidates)
    max_texts: int = 1024  # texts per request (embeddings input, rank candidates)
    max_text_chars: int = 4096  # characters per text
    max_labels: int = MAX_LABELS  # classify labels
    max_templates: int = 64  # classify templates

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "ServeLimits":
        if not d:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown limits {unknown}; known {sorted(known)}")
        vals = {}
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"limit {k} must be a positive integer, got {v!r}")
            vals[k] = v
        return replace(cls(), **vals)

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


class HTTPError(Exception):
    """A client-visible error: HTTP ``status``, human ``message``, machine ``type``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.type = int(status), message, type

    def to_dict(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def bad_request(msg: str, type: str = "invalid_request") -> HTTPError:
    return HTTPError(400, msg, type)


def unprocessable(msg: str) -> HTTPError:
    return HTTPError(422, msg, "invalid_request")


def too_large(msg: str) -> HTTPError:
    return HTTPError(413, msg, "payload_too_large")


def not_found(msg: str, type: str = "not_found") -> HTTPError:
    return HTTPError(404, msg, type)


# ---------------------------------------------------------------------------------- body / JSON
async def read_body(request, limits: ServeLimits) -> bytes:
    """Read a Starlette request body, refusing more than ``limits.max_body_bytes`` (413) without
    buffering the excess."""
    cap = limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise bad_request("invalid Content-Length header") from None
        if n > cap:
            raise too_large(f"request body of {n} bytes exceeds the limit of {cap} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise too_large(f"request body exceeds the limit of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> Dict[str, Any]:
    if not body:
        raise bad_request("empty request body; expected a JSON object", "invalid_json")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON: {e}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise unprocessable(f"the request body must be a JSON object, got {_jtype(obj)}")
    return obj


def _jtype(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def check_keys(obj: Mapping[str, Any], allowed: Sequence[str]) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise unprocessable(f"unknown field(s) {extra}; allowed: {sorted(allowed)}")


def get_str(obj: Mapping[str, Any], key: str, *, required: bool = False,
            limits: Optional[ServeLimits] = None, allow_empty: bool = False) -> Optional[str]:
    if key not in obj or obj[key] is None:
        if required:
            raise unprocessable(f"missing required field {key!r}")
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise unprocessable(f"field {key!r} must be a string, got {_jtype(v)}")
    if not v and not allow_empty:
        raise unprocessable(f"field {key!r} must not be empty")
    if limits is not None and len(v) > limits.max_text_chars:
        raise too_large(f"field {key!r} has {len(v)} characters; the limit is "
                        f"{limits.max_text_chars}")
    return v


def get_str_list(obj: Mapping[str, Any], key: str, *, max_items: int, required: bool = False,
                 allow_scalar: bool = False, max_chars: Optional[int] = None,
                 allow_empty_items: bool = False, what: str = "items") -> Optional[List[str]]:
    """A non-empty list of strings (or one string when ``allow_scalar``)."""
    if key not in obj or obj[key] is None:
        if required:
            raise unprocessable(f"missing required field {key!r}")
        return None
    v = obj[key]
    if allow_scalar and isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        kind = "a string or a list of strings" if allow_scalar else "a list of strings"
        raise unprocessable(f"field {key!r} must be {kind}, got {_jtype(v)}")
    if not v:
        raise unprocessable(f"field {key!r} must not be empty")
    if len(v) > max_items:
        status = 422 if key in ("labels", "templates") else 413
        raise HTTPError(status, f"field {key!r} has {len(v)} {what}; the limit is {max_items}",
                        "invalid_request" if status == 422 else "payload_too_large")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise unprocessable(f"{key}[{i}] must be a string, got {_jtype(s)}")
        if not s and not allow_empty_items:
            raise unprocessable(f"{key}[{i}] must not be empty")
        if max_chars is not None and len(s) > max_chars:
            raise too_large(f"{key}[{i}] has {len(s)} characters; the limit is {max_chars}")
    return list(v)


def get_int(obj: Mapping[str, Any], key: str, *, lo: int, hi: Optional[int] = None
            ) -> Optional[int]:
    if key not in obj or obj[key] is None:
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise unprocessable(f"field {key!r} must be an integer, got {_jtype(v)}")
    if v < lo or (hi is not None and v > hi):
        raise unprocessable(f"field {key!r} must be in [{lo}, {hi if hi is not None else 'inf'}]"
                            f", got {v}")
    return v


# ---------------------------------------------------------------------------------- images
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)?,", re.I)
_WS = re.compile(r"\s+")


def _b64_payload(s: str, where: str) -> str:
    """The base64 part of a data URL (``data:image/png;base64,...``) or of a bare string."""
    if s[:5].lower() == "data:":
        m = _DATA_URL.match(s)
        if m is None:
            raise bad_request(f"{where}: malformed data URL", "invalid_image")
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/") and mime != "application/octet-stream":
            raise bad_request(f"{where}: data URL media type {mime!r} is not an image",
                              "invalid_image")
        if ";base64" not in (m.group("params") or "").lower():
            raise bad_request(f"{where}: only base64 data URLs are supported", "invalid_image")
        return s[m.end():]
    return s


def decode_image(s: Any, where: str, limits: ServeLimits) -> np.ndarray:
    """Base64 or data-URL string -> ``H x W x 3`` uint8 RGB array.

    The base64 length is capped first, then the image header (dimensions) is read lazily with
    ``PIL.Image.open`` and checked against the side/pixel limits before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(s, str):
        raise unprocessable(f"{where} must be a base64 or data URL string, got {_jtype(s)}")
    if len(s) > limits.max_image_bytes:
        raise too_large(f"{where}: {len(s)} bytes of base64 exceeds the limit of "
                        f"{limits.max_image_bytes} bytes")
    payload = _b64_payload(s, where)
    if not payload:
        raise bad_request(f"{where}: empty image data", "invalid_image")
    if _WS.search(payload):
        payload = _WS.sub("", payload)
    if "-" in payload or "_" in payload:  # URL-safe alphabet
        payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{where}: invalid base64 ({e})", "invalid_image") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            w, h = img.size
            if w <= 0 or h <= 0:
                raise bad_request(f"{where}: empty image ({w}x{h})", "invalid_image")
            if max(w, h) > limits.max_image_side or w * h > limits.max_image_pixels:
                raise too_large(f"{where}: image of {w}x{h} exceeds the limit of "
                                f"{limits.max_image_side} px per side / "
                                f"{limits.max_image_pixels} pixels")
            img.load()  # the full decode, now known to be bounded
            if img.mode != "RGB":
                # like fmrt.preprocess.check_image: alpha is dropped, gray is replicated
                img = img.convert("RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except HTTPError:
        raise
    except Image.DecompressionBombError as e:
        raise too_large(f"{where}: {e}") from None
    except UnidentifiedImageError:
        raise bad_request(f"{where}: data is not a recognised image format",
                          "invalid_image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / corrupt
        raise bad_request(f"{where}: cannot decode image ({e})", "invalid_image") from None
    if arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - convert("RGB") guarantees it
        raise bad_request(f"{where}: unsupported image layout {arr.shape}", "invalid_image")
    return np.ascontiguousarray(arr)


def get_images(obj: Mapping[str, Any], key: str, limits: ServeLimits, *, required: bool = False
               ) -> Optional[List[str]]:
    """The raw (undecoded) list of image strings in ``obj[key]``, with count checks."""
    if key not in obj or obj[key] is None:
        if required:
            raise unprocessable(f"missing required field {key!r}")
        return None
    v = obj[key]
    if not isinstance(v, list):
        raise unprocessable(f"field {key!r} must be a list of base64 or data URL strings, "
                            f"got {_jtype(v)}")
    if not v:
        raise unprocessable(f"field {key!r} must not be empty")
    if len(v) > limits.max_images:
        raise too_large(f"field {key!r} has {len(v)} images; the limit is {limits.max_images}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise unprocessable(f"{key}[{i}] must be a base64 or data URL string, "
                                f"got {_jtype(s)}")
    return v


def decode_images(items: Sequence[str], key: str, limits: ServeLimits) -> List[np.ndarray]:
    return [decode_image(s, f"{key}[{i}]", limits) for i, s in enumerate(items)]


def encode_image(img: np.ndarray, fmt: str = "PNG", data_url: bool = True) -> str:
    """Client helper: ``H x W x 3`` uint8 -> base64 (data URL) string."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format=fmt)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{b64}" if data_url else b64


# ---------------------------------------------------------------------------------- responses
def json_response(content: Any, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


def error_response(err: HTTPError):
    return json_response(err.to_dict(), err.status)


def internal_error_response(message: str, status: int = 500, type: str = "internal_error"):
    return error_response(HTTPError(status, message, type))


__all__ = ["ServeLimits", "HTTPError", "read_body", "parse_json_object", "check_keys", "get_str",
           "get_str_list", "get_int", "get_images", "decode_image", "decode_images",
           "encode_image", "json_response", "error_response", "internal_error_response"]

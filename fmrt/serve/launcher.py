"""Start a local Ray instance + Ray Serve and run the fmrt app (``fmrt serve``).

Ray 2.60 turns token authentication on for every new local cluster (``RAY_AUTH_MODE`` unset ->
``token``) and, unless ``RAY_AUTH_TOKEN_PATH``/``RAY_AUTH_TOKEN`` name one, writes a token to
``~/.ray/auth_token``. ``start_ray`` instead writes a fresh random token into a private temporary
directory and points ``RAY_AUTH_TOKEN_PATH`` at it before ``ray.init`` (removed again by
``ServeSession.shutdown``). Ray binds to 127.0.0.1 without a dashboard, and every worker gets the
repository root on ``PYTHONPATH`` so replicas import ``fmrt``.

    from fmrt.serve.launcher import serve_main
    session = serve_main(port=8000, models=["shapes-clip"], backend="torch", blocking=False)
    ...  # http://127.0.0.1:8000/v1/embeddings
    session.shutdown()
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP_NAME = "fmrt"

logger = logging.getLogger("fmrt.serve")
# ray.init attempts when the GCS server misses its start-up deadline (see start_ray)
RAY_START_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RaySession:
    """What ``start_ray`` changed, so that ``stop`` can undo it."""

    token_dir: Optional[str] = None
    saved_env: Dict[str, Optional[str]] = field(default_factory=dict)
    started: bool = False

    def stop(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.saved_env = {}
        if self.token_dir:
            shutil.rmtree(self.token_dir, ignore_errors=True)
            self.token_dir = None


def _set_env(session: RaySession, key: str, value: str) -> None:
    session.saved_env.setdefault(key, os.environ.get(key))
    os.environ[key] = value


_TOKEN: Optional[str] = None


def _process_token() -> str:
    """One random token per process. Ray's driver reads the auth token once per process and
    keeps it, so a second local cluster started after ``shutdown`` (e.g. the next test module's
    Serve instance) must get the same token, or its GCS rejects the driver (InvalidAuthToken)."""
    global _TOKEN
    if _TOKEN is None:
        _TOKEN = secrets.token_hex(32)
    return _TOKEN


def start_ray(*, num_cpus: Optional[int] = None, object_store_memory: Optional[int] = 256 << 20,
              extra_pythonpath: Sequence[str] = (), log_to_driver: bool = True,
              env_vars: Optional[Dict[str, str]] = None) -> RaySession:
    """Start a new local Ray instance following fmrt's rules (see module docstring).

    Returns a ``RaySession`` whose ``stop()`` shuts Ray down and removes the token directory.
    When Ray is already initialised in this process nothing is started (``started=False``)."""
    import ray

    session = RaySession()
    if ray.is_initialized():
        return session
    token_dir = tempfile.mkdtemp(prefix="fmrt-ray-auth-")
    session.token_dir = token_dir
    token_path = os.path.join(token_dir, "auth_token")
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_process_token())
    _set_env(session, "RAY_AUTH_TOKEN_PATH", token_path)
    # ray.init sets RAY_AUTH_MODE=token in this process when unset; stop() restores it.
    session.saved_env.setdefault("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE"))
    # RAY_AUTH_TOKEN would take precedence over the file; RAY_ADDRESS would attach us to someone
    # else's cluster instead of starting our own.
    for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        if k in os.environ:
            session.saved_env.setdefault(k, os.environ.pop(k))
    pythonpath = [REPO_ROOT, *extra_pythonpath]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
                                **(env_vars or {})}}
    kwargs: Dict[str, Any] = {}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if object_store_memory is not None:
        kwargs["object_store_memory"] = object_store_memory
    for attempt in range(RAY_START_ATTEMPTS):
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=log_to_driver,
                     logging_level=logging.WARNING, **kwargs)
            break
        except RuntimeError as e:
            # On a loaded 2-core box the GCS server occasionally misses Ray's start-up
            # deadline ("Timed out waiting for file .../gcs_server_port_..."), typically right
            # after a previous Ray instance shut down; a fresh start succeeds.
            if "Timed out waiting for file" not in str(e) or attempt + 1 == RAY_START_ATTEMPTS:
                session.stop()
                raise
            logger.warning("Ray did not start (%s); retrying", e)
            ray.shutdown()
            time.sleep(2.0)
        except BaseException:
            session.stop()
            raise
    session.started = True
    return session


@dataclass
class ServeSession:
    url: str
    host: str
    port: int
    ray_session: RaySession
    handle: Any = None

    def shutdown(self) -> None:
        from ray import serve

        try:
            serve.shutdown()
        except Exception:  # pragma: no cover - best effort on the way out
            logger.exception("serve.shutdown failed")
        self.ray_session.stop()

    def __enter__(self) -> "ServeSession":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def start_serve(app_args, *, host: str = "127.0.0.1", port: int = 8000,
                ray_kwargs: Optional[Dict[str, Any]] = None) -> ServeSession:
    """Start Ray (``start_ray``) + Serve's HTTP proxy on ``host:port`` and deploy
    ``build_app(app_args)``; returns once every deployment is running."""
    from ray import serve

    from fmrt.serve.app import AppArgs, build_app

    if not isinstance(app_args, AppArgs):
        app_args = AppArgs.model_validate(dict(app_args or {}))
    app = build_app(app_args)  # validate models before paying for a Ray start
    rs = start_ray(**(ray_kwargs or {}))
    try:
        serve.start(http_options={"host": host, "port": int(port)}, proxy_location="HeadOnly")
        handle = serve.run(app, name=APP_NAME, route_prefix=app_args.route_prefix, blocking=False)
    except BaseException:
        try:
            serve.shutdown()
        finally:
            rs.stop()
        raise
    prefix = app_args.route_prefix.rstrip("/")
    return ServeSession(url=f"http://{host}:{port}{prefix}", host=host, port=int(port),
                        ray_session=rs, handle=handle)


def serve_main(host: str = "127.0.0.1", port: int = 8000, models: Optional[List[str]] = None,
               backend: Optional[str] = "onnxruntime", blocking: bool = True,
               **app_kwargs) -> Optional[ServeSession]:
    """Serve ``models`` (default: every bundled CLIP-family model) on ``http://host:port``.

    ``backend=None`` picks onnxruntime when importable, else torch. Extra keyword arguments are
    ``AppArgs`` fields (``max_batch_size``, ``batch_wait_timeout_s``, ``num_replicas``, ...).
    ``blocking=True`` serves until Ctrl-C / SIGTERM, then shuts Serve and Ray down and returns
    None; ``blocking=False`` returns the running ``ServeSession`` (call ``shutdown()``)."""
    from fmrt.serve.app import AppArgs

    args: Dict[str, Any] = dict(app_kwargs)
    if models:
        args["models"] = list(models)
    args["backend"] = backend
    session = start_serve(AppArgs(**args), host=host, port=port)
    print(f"fmrt serving on {session.url}  (routes: /v1/embeddings /v1/classify /v1/rank "
          f"/v1/models /healthz)", flush=True)
    if not blocking:
        return session

    def _term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        session.shutdown()
    return None


__all__ = ["serve_main", "start_serve", "start_ray", "ServeSession", "RaySession", "free_port",
           "REPO_ROOT"]

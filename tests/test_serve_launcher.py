"""``fmrt.serve.launcher.start_ray`` without starting Ray: the retry when the GCS server misses
Ray's start-up deadline, and that other errors are not retried."""
from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")


def _fake_ray(monkeypatch, errors):
    calls = []

    def init(**kw):
        calls.append(kw)
        if errors:
            raise errors.pop(0)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr("fmrt.serve.launcher.time.sleep", lambda s: None)
    return calls


def test_start_ray_retries_gcs_start_timeout(monkeypatch):
    from fmrt.serve.launcher import start_ray

    calls = _fake_ray(monkeypatch, [RuntimeError("Timed out waiting for file /tmp/ray/x/gcs_"
                                                 "server_port_abc")])
    s = start_ray()
    try:
        assert len(calls) == 2 and s.started
        assert calls[1]["_node_ip_address"] == "127.0.0.1"
        assert calls[1]["include_dashboard"] is False
        assert os.path.isfile(os.environ["RAY_AUTH_TOKEN_PATH"])
    finally:
        s.stop()
    assert s.token_dir is None


def test_start_ray_does_not_retry_other_errors(monkeypatch):
    from fmrt.serve.launcher import start_ray

    before = os.environ.get("RAY_AUTH_TOKEN_PATH")
    calls = _fake_ray(monkeypatch, [RuntimeError("something else")])
    with pytest.raises(RuntimeError, match="something else"):
        start_ray()
    assert len(calls) == 1
    assert os.environ.get("RAY_AUTH_TOKEN_PATH") == before   # environment restored

"""`appliance serve`: key creation, flags handed to gunicorn, and the gunicorn command it becomes."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.commands import serve


@pytest.fixture
def execs(monkeypatch, tmp_path) -> list[list[str]]:
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    for name in (
        "APPLIANCE_CONFIG",
        "APPLIANCE_SERVICE__HOST",
        "APPLIANCE_SERVICE__PORT",
        "APPLIANCE_SERVICE__WORKERS",
        "APPLIANCE_PATHS__STATE_DIR",
    ):
        monkeypatch.setenv(name, "")  # records "unset" so whatever serve sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(serve, "open_engine", lambda spec: None)
    calls: list[list[str]] = []
    monkeypatch.setattr(serve.os, "execv", lambda path, argv: calls.append(list(argv)))
    return calls


def test_creates_a_key_0600_prints_it_and_becomes_gunicorn(execs, tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(state))
    result = CliRunner().invoke(serve.serve_command, ["--port", "9123", "--workers", "3", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    key = (state / "api-key").read_text().strip()
    assert key.startswith("apl_") and key in result.output and str(state / "api-key") in result.output
    assert stat.S_IMODE((state / "api-key").stat().st_mode) == 0o600
    assert os.environ["APPLIANCE_SERVICE__PORT"] == "9123" and os.environ["APPLIANCE_SERVICE__WORKERS"] == "3"
    assert os.environ["APPLIANCE_SERVICE__HOST"] == "0.0.0.0"
    (argv,) = execs
    assert argv[:3] == [sys.executable, "-m", "gunicorn"]
    assert Path(argv[argv.index("--config") + 1]).name == "gunicorn.conf.py"
    assert argv[-1] == "service.api.wsgi:application()"

    again = CliRunner().invoke(serve.serve_command, [])
    assert again.exit_code == 0 and key not in again.output  # an existing key is reused, not printed again


def test_keys_from_the_environment_create_no_file(execs, tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_API_KEYS", "k1,k2")
    monkeypatch.setenv("APPLIANCE_PATHS__STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(serve.serve_command, [])
    assert result.exit_code == 0 and "created" not in result.output
    assert not (tmp_path / "state" / "api-key").exists()


def test_spec_file_is_handed_on_as_an_absolute_path(execs, tmp_path):
    spec = tmp_path / "my.toml"
    spec.write_text(f'[paths]\nstate_dir = "{tmp_path / "s"}"\n[service]\nport = 8181\n')
    result = CliRunner().invoke(serve.serve_command, ["--spec", "my.toml"])
    assert result.exit_code == 0, result.output
    assert os.environ["APPLIANCE_CONFIG"] == str(spec)
    assert ":8181" in result.output


def gunicorn_settings() -> dict:
    """service/gunicorn.conf.py evaluated as gunicorn does: a Python file whose globals are the settings."""
    import service

    path = Path(service.__file__).parent / "gunicorn.conf.py"
    settings: dict = {"__file__": str(path)}
    exec(compile(path.read_text(), str(path), "exec"), settings)
    return settings


def test_gunicorn_config_follows_the_spec(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    defaults = gunicorn_settings()
    # docs/api.md: 8 threads per worker and a 30 s graceful timeout unless the environment says otherwise
    assert (defaults["threads"], defaults["graceful_timeout"]) == (8, 30)
    assert (defaults["max_requests"], defaults["max_requests_jitter"]) == (10000, 1000)
    monkeypatch.setenv("APPLIANCE_SERVICE__PORT", "9555")
    monkeypatch.setenv("APPLIANCE_SERVICE__WORKERS", "3")
    monkeypatch.setenv("APPLIANCE_GUNICORN_THREADS", "5")
    monkeypatch.setenv("APPLIANCE_GUNICORN_GRACEFUL_TIMEOUT", "12")
    monkeypatch.setenv("APPLIANCE_GUNICORN_MAX_REQUESTS", "7")
    monkeypatch.setenv("APPLIANCE_GUNICORN_MAX_REQUESTS_JITTER", "0")
    settings = gunicorn_settings()
    assert settings["bind"] == "127.0.0.1:9555" and settings["workers"] == 3
    assert (settings["worker_class"], settings["threads"]) == ("gthread", 5)
    assert (settings["max_requests"], settings["max_requests_jitter"]) == (7, 0)
    # the heartbeat timeout and keep-alive are fixed; keep-alive outlasts common load balancers' idle timeouts
    assert (settings["timeout"], settings["graceful_timeout"], settings["keepalive"]) == (60, 12, 75)
    for hook in ("on_starting", "when_ready", "child_exit", "on_exit"):
        assert callable(settings[hook])

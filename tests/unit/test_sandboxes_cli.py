"""`appliance sandboxes ...` through the `appliance` group, the SDK, the real API app and manager (a fake engine
underneath), in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from appliance.cli import main
from appliance.commands import sandboxes
from service.api import create_app
from service.attachments import take_code_lock

from .fakes import KEY_A, KEY_B, key_id, states


def appliance_sandboxes(*argv: str) -> Result:
    """What a user types: `appliance sandboxes ...`, through the real top-level group (a command missing from it
    fails here with "No such command")."""
    return CliRunner().invoke(main, ["sandboxes", *argv])


@pytest.fixture
def service_overrides() -> dict:
    return {"max_sandboxes_per_key": 4}


@pytest.fixture
def cli(tmp_path, manager, monkeypatch):
    """Runs the group with a clean environment; HTTP goes to the app in this process."""
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    app = create_app(manager.config, manager)
    seen: list[sandboxes.Target] = []

    def client(target: sandboxes.Target) -> httpx.Client:
        seen.append(target)
        return httpx.Client(transport=httpx.WSGITransport(app=app), base_url=target.url)

    monkeypatch.setattr(sandboxes, "http_client", client)

    def run(*args: str, key: str | None = KEY_A):
        argv = [*args, "--url", "http://appliance.test"] + (["--key", key] if key else [])
        return appliance_sandboxes(*argv)

    run.targets = seen
    return run


def test_list_shows_a_table_and_filters_by_state(cli, manager):
    running = manager.create(key_id(manager.config, KEY_A), timeout_s=600)
    frozen = manager.create(key_id(manager.config, KEY_A), persistent=True, timeout_s=300)
    manager.freeze(key_id(manager.config, KEY_A), frozen.id)
    persistent = manager.create(key_id(manager.config, KEY_A), persistent=True, timeout_s=7200)
    (kid,) = manager.fork(key_id(manager.config, KEY_A), running.id, 1)
    manager.create(key_id(manager.config, KEY_B))  # another key's: never shown
    result = cli("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "STATE", "VCPUS", "MEMORY", "LAST", "USED", "WHEN", "IDLE", "FORKED", "FROM"]
    assert len(lines) == 5
    assert running.id in lines[1] and "running" in lines[1] and "close after 10m" in lines[1]
    assert lines[2].split()[:2] == [frozen.id, "frozen"] and "after" not in lines[2]
    assert persistent.id in lines[3] and "freeze after 2h" in lines[3]
    assert kid.id in lines[4] and lines[4].rstrip().endswith(running.id)
    only_frozen = cli("list", "--state", "frozen")
    assert [line.split()[0] for line in only_frozen.output.splitlines()[1:]] == [frozen.id]


def test_list_json_and_empty(cli, manager):
    record = manager.create(key_id(manager.config, KEY_A))
    result = cli("list", "--json")
    assert [s["id"] for s in json.loads(result.output)] == [record.id]
    empty = cli("list", "--state", "lost")
    assert empty.exit_code == 0 and "no lost sandboxes" in empty.output


def test_unknown_state_is_refused_by_the_cli(cli):
    result = cli("list", "--state", "asleep")
    assert result.exit_code == 2 and "running" in result.output


def test_freeze_resume_rm(cli, manager):
    a, b = manager.create(key_id(manager.config, KEY_A)), manager.create(key_id(manager.config, KEY_A))
    result = cli("freeze", a.id, b.id)
    assert result.exit_code == 0 and result.output.splitlines() == [f"{a.id} frozen", f"{b.id} frozen"]
    assert states(manager) == {a.id: "frozen", b.id: "frozen"}
    result = cli("resume", a.id)
    assert result.exit_code == 0 and result.output == f"{a.id} running\n"
    result = cli("rm", a.id, b.id)
    assert result.exit_code == 0 and result.output.splitlines() == [f"{a.id} deleted", f"{b.id} deleted"]
    assert states(manager) == {}


def test_errors_are_one_line_without_traceback(cli, manager):
    record = manager.create(key_id(manager.config, KEY_A))
    missing = cli("freeze", "sb-0000000000000999")
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: sb-0000000000000999: no sandbox") and missing.output.count("\n") == 1
    running = take_code_lock(Path(record.vm_dir))  # an exec in another worker holds the sandbox
    busy = cli("freeze", record.id)
    os.close(running)
    assert busy.exit_code == 1 and "running code" in busy.output and "Traceback" not in busy.output
    wrong_key = cli("list", key="nope")
    assert wrong_key.exit_code == 1 and "not valid" in wrong_key.output and wrong_key.output.count("\n") == 1


def test_several_ids_report_each_failure_and_exit_1(cli, manager):
    record = manager.create(key_id(manager.config, KEY_A))
    result = cli("rm", "sb-0000000000000999", record.id)
    assert result.exit_code == 1
    assert f"{record.id} deleted" in result.output
    assert "Error: sb-0000000000000999: no sandbox" in result.output and "1 of 2 sandboxes failed" in result.output
    assert states(manager) == {}


def test_unreachable_service_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = appliance_sandboxes("list", "--url", "http://127.0.0.1:9", "--key", "k")
    assert result.exit_code == 1
    assert "cannot reach the API at http://127.0.0.1:9" in result.output and result.output.count("\n") == 1


def test_default_url_and_key_come_from_the_spec_and_the_key_file(cli, tmp_path, monkeypatch, manager):
    state = tmp_path / "keys"
    state.mkdir()
    (state / "api-key").write_text(KEY_A + "\n")
    monkeypatch.setenv("APPLIANCE_PATHS__STATE_DIR", str(state))
    monkeypatch.setenv("APPLIANCE_SERVICE__HOST", "0.0.0.0")
    monkeypatch.setenv("APPLIANCE_SERVICE__PORT", "9321")
    manager.create(key_id(manager.config, KEY_A))
    result = appliance_sandboxes("list")
    assert result.exit_code == 0, result.output
    assert cli.targets[-1] == sandboxes.Target("http://127.0.0.1:9321", KEY_A)
    monkeypatch.setenv("APPLIANCE_API_KEYS", f"{KEY_B},other")  # the service's own environment wins over the file
    appliance_sandboxes("list")
    assert cli.targets[-1].key == KEY_B
    monkeypatch.setenv("APPLIANCE_URL", "http://from-env:1")
    monkeypatch.setenv("APPLIANCE_API_KEY", KEY_A)
    appliance_sandboxes("list")
    assert cli.targets[-1] == sandboxes.Target("http://from-env:1", KEY_A)


def test_missing_key_file_says_where_it_looked(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_PATHS__STATE_DIR", str(tmp_path / "nowhere"))
    result = appliance_sandboxes("list")
    assert result.exit_code == 1
    assert str(tmp_path / "nowhere" / "api-key") in result.output and "--key" in result.output


def test_the_appliance_group_offers_exactly_these_commands():
    result = appliance_sandboxes("--help")
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.split("Commands:\n", 1)[1].splitlines() if line.strip()]
    assert sorted(listed) == ["freeze", "list", "resume", "rm"]

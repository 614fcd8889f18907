"""The commands routes' validation (through the real app) and the service's checks of the guest's answers
(service/commands.py against a guest that answers whatever a test gives it)."""

from __future__ import annotations

from typing import Any

import pytest

from service.commands import Commands
from service.errors import Conflict, Invalid, LimitReached, NotFound, ServiceError

from .api_helpers import A, assert_error

SECRET = "value-that-must-not-be-echoed"


@pytest.fixture
def service_overrides() -> dict[str, Any]:
    return {"max_body_bytes": 1 << 20}  # room for the largest bodies below: the field's own limit must answer


@pytest.mark.parametrize(("body", "field"), [
    ({}, "cmd"),
    ({"cmd": []}, "cmd"),
    ({"cmd": "   "}, "cmd"),
    ({"cmd": ["ls", "a\x00b"]}, "cmd"),
    ({"cmd": ["ls"] * 1025}, "cmd"),
    ({"cmd": "ls", "background": "yes"}, "background"),
    ({"cmd": "ls", "timeout_s": 0}, "timeout_s"),
    ({"cmd": "ls", "envs": {"LD_PRELOAD": SECRET}}, "envs"),
    ({"cmd": "ls", "envs": {"9LIVES": SECRET}}, "envs"),
    ({"cmd": "ls", "envs": {"OK": 3}}, "envs"),
    ({"cmd": "ls", "cwd": "/" * 4097}, "cwd"),
    ({"cmd": "ls", "shell": True}, "shell"),
])
def test_a_bad_command_request_is_refused_naming_the_field(client, sandbox_id, body, field):
    response = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/commands", json=body, headers=A)
    assert_error(response, 422, "invalid")
    assert response.json["error"]["field"] == field and SECRET not in response.text


def test_envs_at_create_and_per_exec_are_checked_and_never_echoed(client, sandbox_id):
    too_many = {f"V{i}": "x" for i in range(129)}
    for body in ({"envs": {"HOME": SECRET}}, {"envs": too_many}, {"envs": {"BIG": "x" * (64 << 10)}},
                 {"envs": {"NUL": "a\x00" + SECRET}}):
        response = client.simulate_post("/v1/sandboxes", json=body, headers=A)
        assert_error(response, 422, "invalid")
        assert SECRET not in response.text
    response = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec",
                                    json={"code": "1", "envs": {"PYTHONPATH": SECRET}}, headers=A)
    assert_error(response, 422, "invalid")
    assert SECRET not in response.text


@pytest.mark.parametrize(("path", "method", "body", "field"), [
    ("/commands/cmd-1/signal", "POST", {"signal": "SIGSEGV"}, "signal"),
    ("/commands/cmd-1/stdin", "POST", {"data": 3}, "data"),
    ("/commands/cmd-1/output?offset=-1", "GET", None, "offset"),
    ("/commands/cmd-1/output?max=0", "GET", None, "max"),
    ("/commands/cmd-1?wait_s=61", "GET", None, "wait_s"),
    ("/commands/cmd-1?wait_s=nan", "GET", None, "wait_s"),
    (f"/commands/{'c' * 65}", "GET", None, "command_id"),
])
def test_bad_parameters_of_a_command_are_refused(client, sandbox_id, path, method, body, field):
    route, _, query = path.partition("?")
    response = client.simulate_request(method, f"/v1/sandboxes/{sandbox_id}{route}", query_string=query,
                                       json=body, headers=A)
    assert_error(response, 422, "invalid")
    assert response.json["error"]["field"] == field


class Guest:
    """Answers each call with the next of `answers` (what a hostile or broken guest might send)."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def commands_sandbox(self, owner: str, sandbox_id: str) -> Guest:
        return self

    def call_with(self, op: str, args: dict[str, Any], timeout_s: float = 10.0, payload: bytes = b"") -> dict[str, Any]:
        self.calls.append((op, args))
        return self.answers.pop(0)


STATUS = {"command_id": "cmd-1", "pid": 7, "running": True, "exit_code": None, "signal": None, "timed_out": False,
          "cmd": "sleep 9", "output_bytes": 0, "dropped_bytes": 0}


def _page(**changes: Any) -> dict[str, Any]:
    return {"ev": "ok", "chunks": [], "offset": 0, "next_offset": 0, "dropped_bytes": 0, "status": STATUS, **changes}


@pytest.mark.parametrize("answer", [
    _page(chunks="text"),
    _page(chunks=[["stdin", "x"]]),
    _page(chunks=[["stdout", 5]]),
    _page(chunks=[["stdout", "x" * 41]]),  # more than 4 characters per byte asked for (max=10)
    _page(offset=5, next_offset=4),
    _page(dropped_bytes=-1),
    _page(status={**STATUS, "running": "yes"}),
    _page(status={**STATUS, "pid": True}),
    _page(status={k: v for k, v in STATUS.items() if k != "exit_code"}),
    {"ev": "pong"},
])
def test_a_malformed_answer_from_the_guest_is_refused(answer):
    with pytest.raises(ServiceError) as refused:
        Commands(Guest(answer)).read("key", "sb-1", "cmd-1", 0, limit=10)
    assert type(refused.value) is ServiceError


@pytest.mark.parametrize(("code", "error"), [("not_found", NotFound), ("too_many", LimitReached),
                                             ("conflict", Conflict), ("bad_request", Invalid)])
def test_the_agents_refusals_become_documented_statuses(code, error):
    with pytest.raises(error) as refused:
        Commands(Guest({"ev": "error", "code": code, "message": "m"})).status("key", "sb-1", "cmd-1")
    if error is LimitReached:
        assert refused.value.retry_after == 1


def test_waiting_asks_again_until_the_command_ends_or_the_wait_is_over():
    now = [0.0]
    guest = Guest(*[{"ev": "ok", "status": STATUS}] * 3, {"ev": "ok", "status": {**STATUS, "running": False,
                                                                                  "exit_code": 0}})
    commands = Commands(guest, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert commands.status("key", "sb-1", "cmd-1", wait_s=10)["exit_code"] == 0
    assert len(guest.calls) == 4
    still = Guest(*[{"ev": "ok", "status": STATUS}] * 100)
    commands = Commands(still, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    started = now[0]
    assert commands.status("key", "sb-1", "cmd-1", wait_s=1)["running"] is True
    assert now[0] - started == pytest.approx(1.0) and 3 < len(still.calls) < 20  # slices grow, then stop at wait_s


class _Channel:
    """The engine Sandbox's agent channel, answering a start."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def call(self, op: str, deadline: float, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        self.requests.append((op, args))
        return {"ev": "ok", "command_id": "cmd-1", "pid": 9}


def test_a_commands_own_timeout_reaches_the_agent_through_the_engine_sandbox():
    from service.engine.sandbox import ExecLimits, Sandbox

    channel = _Channel()
    sandbox = Sandbox(None, channel, ExecLimits(timeout_s=1, grace_s=1, output_cap=1, result_cap=1))  # type: ignore[arg-type]

    class Manager:
        def commands_sandbox(self, owner: str, sandbox_id: str) -> Sandbox:
            return sandbox

    started = Commands(Manager()).start("key", "sb-1", ["sleep", "9"], None, "/tmp", {"A": "b"}, 5.0)
    assert started == {"command_id": "cmd-1", "pid": 9}
    assert channel.requests == [("cmd_start", {"argv": ["sleep", "9"], "cwd": "/tmp", "envs": {"A": "b"},
                                               "timeout_s": 5.0})]

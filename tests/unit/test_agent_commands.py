"""Commands beside the REPL and the sandbox's envs, in the guest agent run on this host (no VM needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from appliance_agent import frames, protocol

from tests.unit.agent_harness import HANG_DEADLINE_S, AgentProcess


def _wait_status(agent: AgentProcess, command_id: str, running: bool = False) -> dict:
    deadline = time.monotonic() + HANG_DEADLINE_S
    while time.monotonic() < deadline:
        status = agent.call("cmd_status", command_id=command_id)["status"]
        if status["running"] == running:
            return status
    raise AssertionError(f"{command_id} still running={not running} after {HANG_DEADLINE_S} s")


def _read_all(agent: AgentProcess, command_id: str, offset: int = 0) -> tuple[str, dict]:
    reply = agent.call("cmd_read", command_id=command_id, offset=offset)
    return "".join(text for _stream, text in reply["chunks"]), reply


def _send_stdin(agent: AgentProcess, command_id: str, data: bytes, eof: bool = False) -> dict:
    request_id = 900_000 + len(data)
    agent.send_raw(frames.encode({"id": request_id, "op": "cmd_stdin", "command_id": command_id, "eof": eof}, data))
    return agent.events_for(request_id)[-1]


def test_a_command_runs_beside_a_running_exec_and_reports_its_exit(agent: AgentProcess, tmp_path: Path) -> None:
    flag = str(tmp_path / "go")
    exec_id = agent.send("exec", code=f"import os, time\nwhile not os.path.exists({flag!r}): time.sleep(0.01)")
    started = agent.call("cmd_start", shell=f"echo out; echo err >&2; touch {tmp_path / 'go'}; exit 3",
                         cwd=str(tmp_path))
    assert started["ev"] == "ok", started
    status = _wait_status(agent, started["command_id"])
    assert status["exit_code"] == 3 and status["signal"] is None
    text, reply = _read_all(agent, started["command_id"])
    assert sorted(text.split()) == ["err", "out"]
    assert {stream for stream, _ in reply["chunks"]} == {"stdout", "stderr"}
    assert agent.events_for(exec_id)[-1]["error"] is None  # the exec ended when the command made the file


def test_output_is_read_from_an_offset(agent: AgentProcess, tmp_path: Path) -> None:
    started = agent.call("cmd_start", argv=["/bin/sh", "-c", "printf 0123456789"], cwd=str(tmp_path))
    _wait_status(agent, started["command_id"])
    text, reply = _read_all(agent, started["command_id"], offset=4)
    assert text == "456789" and reply["offset"] == 4 and reply["next_offset"] == 10 and reply["dropped_bytes"] == 0
    text, reply = _read_all(agent, started["command_id"], offset=10)
    assert text == "" and reply["next_offset"] == 10


def test_stdin_reaches_the_program_and_eof_ends_it(agent: AgentProcess, tmp_path: Path) -> None:
    started = agent.call("cmd_start", argv=["cat"], cwd=str(tmp_path))
    reply = _send_stdin(agent, started["command_id"], b"hello\n", eof=True)
    assert reply == {"id": reply["id"], "ev": "ok", "written": 6}
    status = _wait_status(agent, started["command_id"])
    assert status["exit_code"] == 0
    assert _read_all(agent, started["command_id"])[0] == "hello\n"


def test_a_signal_from_the_allow_list_ends_the_command(agent: AgentProcess, tmp_path: Path) -> None:
    started = agent.call("cmd_start", argv=["sleep", "600"], cwd=str(tmp_path))
    refused = agent.call("cmd_signal", command_id=started["command_id"], signal="SIGSEGV")
    assert refused["ev"] == "error" and refused["code"] == protocol.ErrorCode.BAD_REQUEST
    agent.call("cmd_signal", command_id=started["command_id"], signal="SIGTERM")
    status = _wait_status(agent, started["command_id"])
    assert status["signal"] == "SIGTERM" and status["exit_code"] == -15


def test_envs_reach_python_bash_and_commands(agent: AgentProcess, tmp_path: Path) -> None:
    assert agent.call("set_env", envs={"SANDBOX_WIDE": "one"})["names"] == ["SANDBOX_WIDE"]
    assert agent.run("import os; os.environ['SANDBOX_WIDE']").value == "'one'"
    per_exec = agent.run("import os; (os.environ['SANDBOX_WIDE'], os.environ.get('ONLY_NOW'))",
                         envs={"ONLY_NOW": "two"})
    assert per_exec.value == "('one', 'two')"
    assert agent.run("os.environ.get('ONLY_NOW')").value is None  # per exec: gone after it
    bash = agent.run('echo "$SANDBOX_WIDE $ONLY_NOW"', language="bash", envs={"ONLY_NOW": "three"})
    assert bash.stdout == "one three\n"
    started = agent.call("cmd_start", shell='echo "$SANDBOX_WIDE $PER_COMMAND $PWD"', cwd=str(tmp_path),
                         envs={"PER_COMMAND": "four"})
    _wait_status(agent, started["command_id"])
    assert _read_all(agent, started["command_id"])[0] == f"one four {tmp_path}\n"


def test_hostile_command_requests_are_refused(agent: AgentProcess) -> None:
    for args in ({"argv": []}, {"argv": ["a\0b"]}, {"shell": "x", "argv": ["y"]}, {"argv": "ls"},
                 {"shell": "true", "envs": {"LD_PRELOAD": "/x.so"}}, {"shell": "true", "envs": {"1X": "y"}},
                 {"shell": "true", "timeout_s": -1}, {"argv": ["x" * 1024] * 300}):
        reply = agent.call("cmd_start", **args)
        assert reply["ev"] == "error" and reply["code"] == "bad_request", (args, reply)
        assert "/x.so" not in json.dumps(reply)  # errors name a variable, never its value
    assert agent.call("cmd_status", command_id="cmd-999")["code"] == "not_found"
    assert agent.call("cmd_read", command_id="cmd-999", offset=0)["code"] == "not_found"


def test_running_commands_are_capped(agent: AgentProcess, tmp_path: Path) -> None:
    from appliance_agent.commands import MAX_RUNNING

    ids = [agent.call("cmd_start", argv=["sleep", "600"], cwd=str(tmp_path))["command_id"] for _ in range(MAX_RUNNING)]
    refused = agent.call("cmd_start", argv=["true"], cwd=str(tmp_path))
    assert refused["ev"] == "error" and refused["code"] == "too_many"
    agent.call("cmd_signal", command_id=ids[0], signal="SIGKILL")
    _wait_status(agent, ids[0])
    assert agent.call("cmd_start", argv=["true"], cwd=str(tmp_path))["ev"] == "ok"
    listed = agent.call("cmd_list")["commands"]
    assert len(listed) == MAX_RUNNING + 1

"""Commands beside the REPL and sandbox envs (issue 15, parts 1 and 2), for real: the SDK against `appliance serve`
(gunicorn, one worker, the pool keeper) and real microVMs. One service and one sandbox for the module (TCG on a
loaded machine: boots are what costs); the env test forks and freezes a copy of it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from appliance_agent.commands import MAX_RUNNING

from appliance.client import NotFoundError, RateLimitError, Sandbox
from tests.live_service import LiveService

pytestmark = pytest.mark.integration

HANG_S = 600.0  # only a hang reaches this (TCG on 2 cores that other test runs share: a fresh python3 is slow)
# A value that must appear in no log and no registry file: long and unlikely anywhere else.
SECRET = "s3cret-9f2c71d0-value-that-must-not-be-logged"
PORT = 8765


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    # Deadlines for a machine that several test runs share: only a hang reaches them (the boot default is 60 s).
    # Nothing here needs pandas: a light warm-up.
    service = LiveService(workers=1, pool_size=1, ready_timeout_s=1200,
                          env_extra={"APPLIANCE_GUEST__MEMORY_MIB": "512", "APPLIANCE_ENGINE__BOOT_TIMEOUT_S": "600",
                                     "APPLIANCE_SERVICE__WARM_CODE": "import os"})
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def sb(live: LiveService) -> Iterator[Sandbox]:
    with Sandbox(url=live.url, api_key=live.key, envs={"SANDBOX_SECRET": SECRET, "MODE": "test"},
                 request_timeout=HANG_S) as sandbox:
        yield sandbox


def _wait_for_output(handle, needle: str) -> str:
    """Read the command's output on until `needle` shows up (or the command ends, or a hang)."""
    seen, deadline = "", time.monotonic() + HANG_S
    while needle not in seen:
        assert time.monotonic() < deadline, f"no {needle!r} in the output after {HANG_S} s: {seen[-500:]!r}"
        page = handle.read(wait_s=5)
        seen += "".join(chunk["data"] for chunk in page["chunks"])
        assert page["status"]["running"] or page["chunks"], f"ended before {needle!r}: {seen[-500:]!r}"
    return seen


def test_a_background_server_answers_run_code_and_is_read_after_a_reconnect(live: LiveService, sb: Sandbox) -> None:
    server = sb.commands.run(["python3", "-u", "-m", "http.server", str(PORT), "--bind", "127.0.0.1"],
                             background=True, cwd="/tmp")
    assert server.command_id.startswith("cmd-") and server.pid > 1
    _wait_for_output(server, "Serving HTTP")
    offset = server.offset  # what a client read before its connection dropped
    fetched = sb.run_code(f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{PORT}/').status")
    assert fetched.text == "200", fetched
    # A reconnect: another client, another connection, reads on from the offset it kept.
    again = Sandbox.connect(sb.id, url=live.url, api_key=live.key, request_timeout=HANG_S)
    try:  # not `with`: leaving it would delete the module's sandbox
        handle = again.commands.connect(server.command_id, offset=offset)
        log_line = _wait_for_output(handle, '"GET / HTTP/1.1" 200')
        assert "Serving HTTP" not in log_line  # it started where the first client stopped
        assert handle.read(offset=0)["chunks"][0]["data"].startswith("Serving HTTP")  # and any offset is readable
    finally:
        again.detach()
    listed = {item["command_id"]: item for item in sb.commands.list()}
    assert listed[server.command_id]["running"] is True
    server.signal("SIGTERM")
    result = server.wait(timeout=HANG_S)
    assert result.signal == "SIGTERM" and result.exit_code == -15 and result.error is not None
    assert {item["command_id"]: item for item in sb.commands.list()}[server.command_id]["running"] is False


def test_commands_and_the_repl_do_not_wait_for_each_other(sb: Sandbox) -> None:
    started, flag = "/tmp/exec-started", "/tmp/made-by-a-command"
    # The exec says it runs, then waits for the command's file; the command waits for the exec to run, then makes
    # the file. Both end only if each runs while the other does (else both hang until HANG_S).
    waiting = (f"import os, time\nopen({started!r}, 'w').close()\n"
               f"while not os.path.exists({flag!r}): time.sleep(0.02)\n'seen'")
    answer: dict = {}
    runner = threading.Thread(target=lambda: answer.update(result=sb.run_code(waiting, timeout=HANG_S)))
    runner.start()
    made = None
    try:
        made = sb.commands.run(f"while [ ! -e {started} ]; do sleep 0.02; done; touch {flag} && echo made",
                               timeout=HANG_S)
        assert made.stdout == "made\n" and made.exit_code == 0 and made.error is None
    finally:
        if made is None:  # the command failed: end the exec that waits for it
            sb.interrupt()
        runner.join(HANG_S)
    assert answer["result"].text == "'seen'"


def test_stdin_reaches_an_interactive_program(sb: Sandbox) -> None:
    reader = sb.commands.run('read -r name; echo "hello $name"; cat', background=True)
    assert reader.send_stdin("appliance\n") == len("appliance\n")
    _wait_for_output(reader, "hello appliance")
    reader.send_stdin("and the rest", eof=True)
    result = reader.wait(timeout=HANG_S)
    assert result.exit_code == 0 and result.stdout == "and the rest"


def test_a_foreground_command_streams_and_reports_its_exit(live: LiveService, sb: Sandbox) -> None:
    result = sb.commands.run(["bash", "-c", 'echo "$MODE $PWD"; echo oops >&2; exit 3'], cwd="/tmp")
    assert (result.stdout, result.stderr, result.exit_code) == ("test /tmp\n", "oops\n", 3)
    with live.client() as api, api.stream("POST", f"/v1/sandboxes/{sb.id}/commands", json={"cmd": "echo one; echo two"},
                                          headers={"Accept": "application/x-ndjson"}, timeout=HANG_S) as response:
        events = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert events[0]["type"] == "started" and events[-1]["type"] == "done" and events[-1]["exit_code"] == 0
    assert "".join(event["data"] for event in events if event["type"] == "stdout") == "one\ntwo\n"


def test_running_commands_are_capped_per_sandbox(live: LiveService, sb: Sandbox) -> None:
    sleepers = []
    try:  # started inside: whatever fails, every sleeper started is killed again
        for _ in range(MAX_RUNNING):
            sleepers.append(sb.commands.run(["sleep", "600"], background=True))
        with pytest.raises(RateLimitError) as refused:
            sb.commands.run(["true"], background=True)
        assert refused.value.status == 429 and refused.value.code == "limit_reached"
        assert refused.value.retry_after is not None
    finally:
        for sleeper in sleepers:
            sleeper.kill()
    for sleeper in sleepers:
        assert sleeper.wait(timeout=HANG_S).signal == "SIGKILL"
    assert sb.commands.run("echo room again").stdout == "room again\n"
    with pytest.raises(NotFoundError):
        sb.commands.connect("cmd-99999").status()
    with live.client() as api:
        bad = api.post(f"/v1/sandboxes/{sb.id}/commands/{sleepers[0].command_id}/signal", json={"signal": "SIGSEGV"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "signal"


ENVIRONMENT = "import os\n(os.environ.get('SANDBOX_SECRET'), os.environ.get('MODE'), os.environ.get('ONLY_NOW'))"


def test_envs_reach_python_and_bash_survive_fork_and_freeze_and_are_never_logged(live: LiveService,
                                                                                sb: Sandbox) -> None:
    assert sb.run_code(ENVIRONMENT).text == repr((SECRET, "test", None))
    assert sb.run_code(ENVIRONMENT, envs={"ONLY_NOW": "yes"}).text == repr((SECRET, "test", "yes"))
    assert sb.run_code(ENVIRONMENT).text == repr((SECRET, "test", None))  # per exec: gone again
    bash = sb.run_code('echo "$SANDBOX_SECRET $ONLY_NOW"', language="bash", envs={"ONLY_NOW": "bash"})
    assert bash.stdout == f"{SECRET} bash\n"
    (copy,) = sb.fork(1)
    with copy:
        assert copy.run_code(ENVIRONMENT).text == repr((SECRET, "test", None))
        copy.freeze()
        assert copy.refresh()["state"] == "frozen"
        assert copy.run_code(ENVIRONMENT).text == repr((SECRET, "test", None))  # resumed by the exec
        assert copy.commands.run('echo "$SANDBOX_SECRET"').stdout == f"{SECRET}\n"
    with live.client() as api:
        described = httpx.Response(200, content=api.get(f"/v1/sandboxes/{sb.id}").content).text
    assert SECRET not in described
    leaks = [path for path in [live.log_path, *live.state_dir.rglob("*")]
             if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert leaks == [], f"the env value was written to {leaks}"
    with live.client() as api:
        refused = api.post("/v1/sandboxes", json={"envs": {"LD_PRELOAD": SECRET}})
    assert refused.status_code == 422 and SECRET not in refused.text

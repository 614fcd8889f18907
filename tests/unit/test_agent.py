"""The guest agent and its REPL worker, run on this host over --stdio (no VM needed)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from appliance_agent import protocol

from tests.unit.agent_harness import (
    HANG_DEADLINE_S,
    AgentConnection,
    AgentProcess,
    children_of,
    session_members,
    wait_for,
)

AgentFactory = Callable[..., AgentProcess]


def test_ping_answers_with_versions_and_the_worker_pid(agent: AgentProcess) -> None:
    pong = agent.call("ping")
    assert pong["ev"] == "pong"
    assert pong["protocol"] == protocol.PROTOCOL_VERSION
    assert isinstance(pong["agent_version"], str)
    os.kill(pong["worker_pid"], 0)  # a live process


def test_hello_is_sent_first(agent_factory: AgentFactory) -> None:
    process = AgentProcess.start()
    try:
        hello = process.next_event()
        assert hello == {"id": 0, "ev": "hello", "protocol": 1, "agent_version": hello["agent_version"]}
    finally:
        process.close()


def test_state_persists_and_a_trailing_expression_is_the_value(agent: AgentProcess) -> None:
    assert agent.run("x = 41").done["value"] is None
    result = agent.run("y = x + 1\ny")
    assert result.value == "42"
    assert result.error is None
    assert result.done["exit_code"] is None
    assert result.done["worker_restarted"] is False
    assert agent.run("None").done["value"] is None
    assert agent.run("y;").done["value"] is None  # a trailing semicolon hides the value, as in IPython
    assert agent.run("'a' * 3").value == "'aaa'"


def test_exception_shows_the_user_line_and_keeps_the_namespace(agent: AgentProcess) -> None:
    agent.run("def f(d):\n    return 1 / d\n")
    result = agent.run("kept = 5\nf(0)")
    error = result.error
    assert error is not None
    assert error["name"] == "ZeroDivisionError"
    assert error["value"] == "division by zero"
    assert "return 1 / d" in error["traceback"]  # the line of the earlier cell, from the right cell
    assert "f(0)" in error["traceback"]
    assert "appliance_agent" not in error["traceback"]
    assert error["traceback"].rstrip().endswith("ZeroDivisionError: division by zero")
    assert agent.run("kept").value == "5"


def test_syntax_error_is_reported_like_an_exception(agent: AgentProcess) -> None:
    agent.run("a = 1")
    error = agent.run("b = = 2").error
    assert error is not None
    assert error["name"] == "SyntaxError"
    assert "b = = 2" in error["traceback"]
    assert "^" in error["traceback"]
    assert "appliance_agent" not in error["traceback"]
    assert agent.run("a").value == "1"


def test_system_exit_is_an_error_not_the_end_of_the_namespace(agent: AgentProcess) -> None:
    agent.run("kept = 1")
    result = agent.run("import sys\nsys.exit(2)")
    assert result.error is not None and result.error["name"] == "SystemExit"
    assert agent.run("kept").value == "1"


def test_timeout_interrupts_and_keeps_the_namespace(agent: AgentProcess) -> None:
    worker = agent.worker_pid()
    agent.run("z = 7")
    # The code would sleep for an hour: only the agent's 0.3 s timeout can end it within the harness's hang
    # deadline, and only the interrupt (not the kill after grace_s) keeps the worker.
    result = agent.run("import time\ntime.sleep(3600)", timeout_s=0.3, grace_s=5)
    assert result.error is not None
    assert result.error["name"] == "TimeoutError"
    assert result.error["value"] == "execution exceeded 0.3 s and was interrupted; the namespace is kept"
    assert "time.sleep(3600)" in result.error["traceback"]
    assert "appliance_agent" not in result.error["traceback"]
    assert result.done["worker_restarted"] is False
    assert agent.run("z").value == "7"
    assert agent.worker_pid() == worker


@pytest.mark.parametrize(
    ("code", "stdout"),
    [
        ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", ""),
        (
            "while True:\n    try:\n        while True:\n            pass\n"
            "    except KeyboardInterrupt:\n        print('caught', flush=True)",
            "caught\n",
        ),
    ],
    ids=["sigint-ignored", "keyboardinterrupt-caught"],
)
def test_code_that_ignores_the_interrupt_is_killed_after_grace(agent: AgentProcess, code: str, stdout: str) -> None:
    old_worker = agent.worker_pid()
    agent.run("z = 7")
    result = agent.run(code, timeout_s=0.3, grace_s=0.4)
    # 'caught': the code ran on after the interrupt, so the kill came later, not with it.
    assert result.stdout == stdout
    assert result.error is not None and result.error["name"] == "TimeoutError"
    assert result.done["worker_restarted"] is True
    assert result.done["worker_exit"] == (
        "the Python process was killed after ignoring the interrupt for 0.4 s; its state is lost"
    )
    assert agent.worker_pid() != old_worker
    assert agent.run("z").error["name"] == "NameError"  # a fresh namespace
    assert agent.run("1 + 1").value == "2"


def test_worker_exit_is_reported_and_the_next_exec_gets_a_fresh_worker(agent: AgentProcess) -> None:
    old_worker = agent.worker_pid()
    agent.run("a = 1")
    result = agent.run("print('bye', flush=True)\nimport os\nos._exit(3)")
    text = "the Python process exited with code 3; its state is lost"
    assert result.stdout == "bye\n"
    assert result.error == {"name": "WorkerExited", "value": text, "traceback": ""}
    assert result.done["worker_restarted"] is True
    assert result.done["worker_exit"] == text
    assert agent.run("a").error["name"] == "NameError"
    assert agent.worker_pid() != old_worker


def test_worker_killed_by_a_signal_names_the_signal(agent: AgentProcess) -> None:
    result = agent.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert result.done["worker_exit"] == "the Python process was killed by signal SIGKILL (9); its state is lost"
    assert agent.run("2 * 3").value == "6"


def test_a_worker_lost_while_idle_is_reported_with_the_next_exec(agent: AgentProcess) -> None:
    agent.run("a = 1")
    old_worker = agent.worker_pid()
    os.kill(old_worker, 9)
    wait_for(lambda: agent.worker_pid() != old_worker, "a new worker")  # replaced as soon as the agent reaps it
    result = agent.run("1")
    assert result.value == "1"
    assert result.done["worker_restarted"] is True
    assert "killed by signal SIGKILL" in result.done["worker_exit"]
    assert agent.run("2").done["worker_restarted"] is False


def test_restart_worker_gives_a_fresh_namespace(agent: AgentProcess) -> None:
    old_worker = agent.worker_pid()
    agent.run("a = 1")
    assert agent.call("restart_worker")["ev"] == "ok"
    assert agent.worker_pid() != old_worker
    assert agent.run("a").error["name"] == "NameError"


def test_huge_output_is_capped_and_counted(agent: AgentProcess) -> None:
    """How fast the agent gets through the 50 MB is bench/agent_bench.py's business."""
    code = (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.write(chunk)\n"
        "print('end', file=sys.stderr)"
    )
    cap = 1_000_000
    result = agent.run(code, output_cap=cap)
    total = 50 * (1 << 20) + len("end\n")
    assert result.done["truncated_bytes"] == total - cap
    assert result.stdout == "x" * cap
    assert result.stderr == protocol.TRUNCATION_MARKER.format(omitted=total - cap)


def test_output_under_the_cap_is_complete_and_before_done(agent: AgentProcess) -> None:
    result = agent.run("print('a' * 300000)\nimport sys\nsys.stderr.write('e' * 70000)")
    assert result.stdout == "a" * 300000 + "\n"
    assert result.stderr == "e" * 70000
    assert result.done["truncated_bytes"] == 0


def test_invalid_and_split_utf8_output(agent: AgentProcess) -> None:
    code = (
        "import fcntl, struct, sys, termios, time\n"
        "sys.stdout.buffer.write(b'\\xff\\xfeok \\xc3'); sys.stdout.buffer.flush()\n"
        "# the second half of '\u00e9' only once the agent has read the first (the pipe on fd 1 is empty again)\n"
        "while struct.unpack('i', fcntl.ioctl(1, termios.FIONREAD, b'xxxx'))[0]:\n"
        "    time.sleep(0.001)\n"
        "sys.stdout.buffer.write(b'\\xa9\\n'); sys.stdout.buffer.flush()"
    )
    assert agent.run(code).stdout == "\ufffd\ufffdok é\n"


def test_output_streams_while_the_code_runs(agent: AgentProcess) -> None:
    # The code prints (no flush) and then sleeps for an hour: if its line came only with the end of the code,
    # the test would never see it and so never send the interrupt that ends the code.
    code = "import time\ntry:\n    print(0)\n    time.sleep(3600)\nexcept KeyboardInterrupt:\n    print('end')"
    request_id = agent.send("exec", code=code)
    first = agent.next_event()
    assert first == {"id": request_id, "ev": "stdout", "data": "0\n"}
    agent.send("interrupt")
    rest = agent.events_for(request_id)
    assert [event["ev"] for event in rest] == ["stdout", "done"]
    assert rest[0]["data"] == "end\n" and rest[-1]["error"] is None


def test_display_keeps_its_place_between_prints(agent: AgentProcess) -> None:
    result = agent.run("print('a')\ndisplay(5)\nprint('b')\ndisplay('s', 6)\nprint('c')")
    events = [(event["ev"], event["data"]) for event in result.events[:-1]]
    assert events == [
        ("stdout", "a\n"),
        ("display", {"text/plain": "5"}),
        ("stdout", "b\n"),
        ("display", {"text/plain": "'s'"}),
        ("display", {"text/plain": "6"}),
        ("stdout", "c\n"),
    ]
    many = agent.run("for i in range(30):\n    print(i)\n    display(i)")
    seen = []
    for event in many.events[:-1]:
        if event["ev"] == "stdout":
            seen += [("print", line) for line in event["data"].splitlines()]
        else:
            seen.append(("display", event["data"]["text/plain"]))
    assert seen == [(kind, str(i)) for i in range(30) for kind in ("print", "display")]


def test_rich_representations_become_mime_types(agent: AgentProcess) -> None:
    agent.run(
        "class Table:\n"
        "    def _repr_html_(self):\n        return '<table></table>'\n"
        "    def __repr__(self):\n        return 'Table()'\n"
        "class Picture:\n"
        "    def _repr_png_(self):\n        return b'\\x89PNG'\n"
    )
    assert agent.run("Table()").done["value"] == {"text/plain": "Table()", "text/html": "<table></table>"}
    value = agent.run("Picture()").done["value"]
    assert base64.b64decode(value["image/png"]) == b"\x89PNG"
    assert agent.run("display(Table())").displays == [{"text/plain": "Table()", "text/html": "<table></table>"}]
    huge = agent.run("list(range(100000))").value
    assert huge is not None and len(huge) < 70000 and huge.endswith("more characters]")


FAKE_PYPLOT = """
from matplotlib.figure import Figure
_figures = {}
def figure(num=None):
    if num is None:
        num = max(_figures, default=0) + 1
    return _figures.setdefault(num, Figure(num))
def get_fignums():
    return sorted(_figures)
def close(fig):
    _figures.pop(fig.number, None)
def show(*args, **kwargs):
    import warnings
    warnings.warn("FigureCanvasAgg is non-interactive, and thus cannot be shown")
"""
FAKE_FIGURE = """
class Figure:
    def __init__(self, number):
        self.number = number
    def savefig(self, buffer, format=None, **kwargs):
        buffer.write(b"PNG%d" % self.number)
"""


def test_pyplot_figures_are_shown_as_png(agent_factory: AgentFactory, tmp_path: Path) -> None:
    # A stand-in for matplotlib (not installed here) with the pyplot calls the worker relies on.
    package = tmp_path / "matplotlib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "pyplot.py").write_text(FAKE_PYPLOT)
    (package / "figure.py").write_text(FAKE_FIGURE)
    agent = agent_factory(env={"PYTHONPATH": str(tmp_path)})

    def pngs(result: object) -> list[bytes]:
        return [base64.b64decode(bundle["image/png"]) for bundle in result.displays]  # type: ignore[attr-defined]

    shown = agent.run("import matplotlib.pyplot as plt\nplt.figure()\nplt.show()\nprint('after')")
    assert pngs(shown) == [b"PNG1"]
    assert shown.stderr == ""  # the real show() was replaced before it could warn
    assert shown.stdout == "after\n"
    assert [event["ev"] for event in shown.events] == ["display", "stdout", "done"]
    left_open = agent.run("fig = plt.figure()\n1")
    assert pngs(left_open) == [b"PNG1"]  # like Jupyter inline: a cell's open figures are shown after it
    assert left_open.value == "1"
    assert agent.run("plt.get_fignums()").value == "[]"
    value = agent.run("fig").done["value"]
    assert base64.b64decode(value["image/png"]) == b"PNG1"


def test_text_without_a_utf8_form_still_makes_a_message(agent: AgentProcess) -> None:
    result = agent.run("class Odd:\n    def __repr__(self):\n        return 'x\\ud800'\nOdd()")
    assert result.value == "x\ud800"


def test_code_reaches_the_worker_intact(agent: AgentProcess) -> None:
    code = "text = 'é€\\n'\nexec_ = 3\n# exec 99\n\n(text, exec_, len(text))"
    assert agent.run(code).value == "('é€\\n', 3, 3)"
    assert agent.run("a = 1\r\nb = 2\r\na + b").value == "3"
    # A lone surrogate has no UTF-8 form: JSON escapes it, it crosses the pipe, and compile() refuses it.
    request_id = agent.send_raw_request({"op": "exec", "code": "'\ud800'"})
    error = agent.events_for(request_id)[-1]["error"]
    assert error["name"] == "UnicodeEncodeError" and "surrogates not allowed" in error["value"]
    assert agent.run("exec_").value == "3"


def test_the_worker_sees_an_interpreter_like_environment(agent: AgentProcess) -> None:
    assert agent.run("import sys\nsys.argv").value == "['']"
    assert agent.run("__name__").value == "'__main__'"
    assert agent.run("sys.path[0]").value == "''"
    package_parent = os.path.dirname(os.path.dirname(protocol.__file__))
    assert agent.run(f"{package_parent!r} in sys.path").value == "False"  # the boot path entry is gone again
    assert agent.run("import os\nos.getcwd()").value == repr(os.getcwd())


def test_bash_runs_with_exit_codes(agent: AgentProcess, tmp_path: Path) -> None:
    result = agent.run("echo out; echo err >&2; exit 3", language="bash")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.done["exit_code"] == 3
    assert result.error == {"name": "CalledProcessError", "value": "bash exited with code 3", "traceback": ""}
    ok = agent.run("pwd", language="bash")
    assert ok.done["exit_code"] == 0 and ok.error is None
    assert ok.stdout.strip() == os.getcwd()  # the agent's directory (/data in the guest)


def test_bash_timeout_kills_its_process_group(agent: AgentProcess) -> None:
    worker = agent.worker_pid()
    result = agent.run("sleep 3600 & sleep 3600; echo never", language="bash", timeout_s=0.3)
    assert result.error is not None and result.error["name"] == "TimeoutError"
    assert result.done["exit_code"] == -9
    assert "never" not in result.stdout
    # Both sleeps (the one in the background too) are gone: only the agent and its worker are left.
    left = sorted([agent.pid, worker])
    wait_for(lambda: sorted(session_members(agent.pid)) == left, "the command's processes to end")
    assert agent.run("echo again", language="bash").stdout == "again\n"


def test_a_second_exec_while_one_runs_is_busy_but_other_requests_are_served(agent: AgentProcess) -> None:
    running = agent.send("exec", code="import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert agent.next_event() == {"id": running, "ev": "stdout", "data": "started\n"}
    busy = agent.call("exec", code="1")
    assert busy["ev"] == "error" and busy["code"] == protocol.ErrorCode.BUSY
    assert agent.call("ping")["ev"] == "pong"
    assert agent.call("reseed", seed_hex="00ff")["ev"] == "ok"
    assert agent.call("interrupt")["ev"] == "ok"
    done = agent.events_for(running)[-1]
    assert done["error"]["name"] == "KeyboardInterrupt"
    assert done["worker_restarted"] is False
    assert agent.run("3").value == "3"


def test_an_interrupt_right_after_a_restart_does_not_kill_the_new_worker(agent: AgentProcess) -> None:
    for _ in range(3):
        agent.call("restart_worker")
        worker = agent.worker_pid()
        running = agent.send("exec", code="import time\ntime.sleep(30)")
        agent.send("interrupt")
        done = agent.events_for(running)[-1]
        assert done["error"]["name"] == "KeyboardInterrupt"
        assert done["worker_restarted"] is False
        assert agent.worker_pid() == worker
        assert agent.run("1").value == "1"


def test_malformed_requests_get_errors_and_the_agent_lives_on(agent: AgentProcess) -> None:
    agent.send_raw(b"garbage\n")
    assert agent.next_event() == {"id": 0, "ev": "error", "code": "bad_request", "message": "not JSON: b'garbage'"}
    for line, expected_id, code in [
        (b"[1, 2]\n", 0, "bad_request"),
        (b'{"id": "x", "op": "ping"}\n', 0, "bad_request"),
        (b"\xff\xfe{\n", 0, "bad_request"),
        (b'{"id": 5}\n', 0, "bad_request"),
        (b'{"id": 6, "op": "nope"}\n', 6, "unknown_op"),
        (b'{"id": 7, "op": "exec"}\n', 7, "bad_request"),
        (b'{"id": 8, "op": "exec", "code": "1", "language": "cobol"}\n', 8, "bad_request"),
        (b'{"id": 9, "op": "exec", "code": "1", "timeout_s": -1}\n', 9, "bad_request"),
        (b'{"id": 10, "op": "reseed", "seed_hex": "xyz"}\n', 10, "bad_request"),
        (b'{"id": 11, "op": "set_clock", "unix_ns": "soon"}\n', 11, "bad_request"),
        (b'{"id": 12, "ev": "pong"}\n', 12, "bad_request"),
    ]:
        agent.send_raw(line)
        event = agent.next_event()
        assert (event["id"], event["ev"], event["code"]) == (expected_id, "error", code), line
    assert agent.run("1 + 1").value == "2"


def test_reseed_gives_clones_different_random_streams(agent_factory: AgentFactory) -> None:
    def draw(seed_hex: str) -> str:
        agent = agent_factory()
        agent.run("import random\nrandom.seed(1234)")  # the state a cloned VM would share
        assert agent.call("reseed", seed_hex=seed_hex)["ev"] == "ok"
        value = agent.run("random.random()").value
        assert value is not None
        return value

    first, second, first_again = draw("aa" * 32), draw("bb" * 32), draw("aa" * 32)
    assert first != second
    assert first == first_again


def test_set_clock_validates_its_argument(agent: AgentProcess) -> None:
    # Setting the host's clock for real is not something a unit test may do; the guest path is integration.
    event = agent.call("set_clock", unix_ns=-1)
    assert event["ev"] == "error" and event["code"] == "bad_request"


def test_set_clock_without_the_privilege_is_an_internal_error(agent_factory: AgentFactory) -> None:
    if os.geteuid() != 0:
        agent = agent_factory()
    else:  # drop root, else the test would really set this machine's clock
        agent = agent_factory(prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"), cwd="/")
    event = agent.call("set_clock", unix_ns=time.time_ns())
    assert event["ev"] == "error" and event["code"] == "internal"
    assert "cannot set the clock" in event["message"]


def test_top_level_await_and_pickling_cell_classes(agent: AgentProcess) -> None:
    assert agent.run("import asyncio\nawait asyncio.sleep(0)\n5").value == "5"
    agent.run("class Point:\n    pass\n")
    assert agent.run("import pickle\ntype(pickle.loads(pickle.dumps(Point()))).__name__").value == "'Point'"


def test_stdin_is_empty_for_user_code(agent: AgentProcess) -> None:
    assert agent.run("input()").error["name"] == "EOFError"


def test_orphans_of_user_code_are_reaped(agent_factory: AgentFactory) -> None:
    agent = agent_factory("--subreaper")  # what PID 1 gets for free
    worker = agent.worker_pid()
    agent.run("import os\nos.system('sleep 3600 &')")
    [(orphan, state)] = [child for child in children_of(agent.pid) if child[0] != worker]  # the agent adopted it
    assert state != "Z"
    os.kill(orphan, signal.SIGKILL)  # its end leaves a zombie only its new parent, the agent, can reap
    wait_for(lambda: [pid for pid, _ in children_of(agent.pid)] == [worker], "the agent to reap the orphan")


def test_as_pid1_the_agent_reaps_orphans_and_ignores_sigterm(agent_factory: AgentFactory) -> None:
    """In a new PID namespace the agent is PID 1, as in the guest (needs root or user namespaces)."""
    unshare = ("unshare", "--pid", "--fork", "--mount-proc")
    probe = subprocess.run([*unshare, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    agent = agent_factory(prefix=unshare)
    assert agent.run("import os\nos.getppid()").value == "1"  # the worker's parent is PID 1
    [(agent_pid, _)] = children_of(agent.pid)  # the agent, seen from outside the namespace
    [(worker, _)] = children_of(agent_pid)
    agent.run("os.system('sleep 3600 &')\nos.kill(1, 15)")  # an orphan for PID 1, and a SIGTERM
    [orphan] = [pid for pid, _ in children_of(agent_pid) if pid != worker]
    os.kill(orphan, signal.SIGKILL)
    # Reaped through the same signal pipe that carried the SIGTERM first: had the agent obeyed it, it would
    # be gone by now.
    wait_for(lambda: [pid for pid, _ in children_of(agent_pid)] == [worker], "PID 1 to reap the orphan")
    assert agent.run("'still here'").value == "'still here'"
    [(_, state)] = children_of(agent_pid)  # only the worker is left, and no zombie
    assert state != "Z"


def test_channels_share_one_worker_and_answer_on_their_own(agent_factory: AgentFactory) -> None:
    ours, theirs = socket.socketpair()
    other_ours, other_theirs = socket.socketpair()
    try:
        agent = agent_factory(
            "--fd", str(theirs.fileno()), "--fd", str(other_theirs.fileno()),
            pass_fds=(theirs.fileno(), other_theirs.fileno()),
        )  # fmt: skip
        first = AgentConnection(ours.fileno(), ours.fileno())
        second = AgentConnection(other_ours.fileno(), other_ours.fileno())
        assert first.next_event()["ev"] == "hello" and second.next_event()["ev"] == "hello"
        first.run("shared = 1")
        running = first.send("exec", code="import time\nprint('go', flush=True)\ntime.sleep(30)")
        assert first.next_event()["data"] == "go\n"
        assert second.call("exec", code="shared")["code"] == "busy"
        assert agent.call("exec", code="shared")["code"] == "busy"
        assert second.call("interrupt")["ev"] == "ok"  # any connection may interrupt the running code
        assert first.events_for(running)[-1]["error"]["name"] == "KeyboardInterrupt"
        assert second.run("shared").value == "1"
        first.close()
        second.close()
    finally:
        for sock in (ours, theirs, other_ours, other_theirs):
            sock.close()


def test_the_agent_outlives_a_disconnected_character_device(agent_factory: AgentFactory) -> None:
    """A pty master stands in for a virtio-serial port: with no peer, read fails and poll says POLLHUP."""
    import tty

    master, slave = os.openpty()
    slave_path = os.ttyname(slave)
    tty.setraw(slave)
    os.close(slave)  # the "host" is away
    try:
        agent = agent_factory("--fd", str(master), pass_fds=(master,))
        # With the host away the agent probes the port (one read(2) each time) and sleeps in poll in between:
        # one voluntary context switch per probe. Watching the hung-up port instead, poll would return at once,
        # forever: reads with no sleep between them. Counted, not timed, so a loaded host changes nothing.
        first = _proc_counter(agent.pid, "io", "syscr")
        wait_for(lambda: _proc_counter(agent.pid, "io", "syscr") >= first + 3, "the agent to probe the port")
        switches = _proc_counter(agent.pid, "status", "voluntary_ctxt_switches")
        reads = _proc_counter(agent.pid, "io", "syscr")
        wait_for(lambda: _proc_counter(agent.pid, "io", "syscr") >= reads + 20, "20 more probes")
        reads = _proc_counter(agent.pid, "io", "syscr") - reads
        switches = _proc_counter(agent.pid, "status", "voluntary_ctxt_switches") - switches
        assert switches >= reads // 2, f"{reads} reads of the absent host with only {switches} sleeps: spinning"
        peer = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(peer)
        try:
            host = AgentConnection(peer, peer)
            assert host.next_event()["ev"] == "hello"  # sent again when the host comes back
            assert host.run("6 * 7").value == "42"
            host.close()
        finally:
            os.close(peer)
    finally:
        os.close(master)


def _proc_counter(pid: int, name: str, key: str) -> int:
    """A counter of a (single-threaded) process from /proc/<pid>/io or /proc/<pid>/status."""
    with open(f"/proc/{pid}/{name}", encoding="utf-8") as handle:
        for line in handle:
            label, _, value = line.partition(":")
            if label == key:
                return int(value)
    raise KeyError(f"no {key} in /proc/{pid}/{name}")


def test_end_of_input_lets_the_running_exec_finish(agent: AgentProcess, tmp_path: Path) -> None:
    go = tmp_path / "go"  # the code runs until the test creates this file, after the agent's input has ended
    code = f"import os, time\nprint('started', flush=True)\nwhile not os.path.exists({str(go)!r}):\n"
    request_id = agent.send("exec", code=code + "    time.sleep(0.01)\nprint('finished')")
    assert agent.next_event() == {"id": request_id, "ev": "stdout", "data": "started\n"}
    assert agent.process.stdin is not None
    agent.process.stdin.close()
    go.touch()
    events = agent.events_for(request_id)
    assert events[0]["data"] == "finished\n" and events[-1]["ev"] == "done"
    assert agent.process.wait(timeout=HANG_DEADLINE_S) == 0


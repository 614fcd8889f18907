"""The agent: serves protocol requests from the host and runs one exec at a time in the worker or in bash.

One thread, one event loop (loop.py) over the host channel, the worker's control and output pipes, the
output pipes of a bash command, and a signal pipe (SIGCHLD: the agent reaps every child, being PID 1).
Requests other than exec are answered at once, also while an exec runs.
"""

from __future__ import annotations

import json
import os
import signal
import time

from appliance_agent import (
    __version__,
    arguments,
    children,
    codegroups,
    commands,
    envs,
    fileops,
    files,
    frames,
    protocol,
    sysops,
)
from appliance_agent.arguments import BadRequest, ExecArgs
from appliance_agent.arguments import error as error_result
from appliance_agent.arguments import seconds as _seconds
from appliance_agent.channel import HostChannel, Outbox
from appliance_agent.children import Child, WorkerProcess
from appliance_agent.codeuser import CodeUser
from appliance_agent.loop import Loop
from appliance_agent.output import OutputSink
from appliance_agent.pipes import DONE_QUIET, exec_request
from appliance_agent.protocol import ErrorCode

# Only for annotations (never evaluated, see the __future__ import): `typing` costs boot time under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

AGENT_VERSION = __version__
READ_SIZE = 1 << 18
# Small pieces of output are merged for this long (or up to FLUSH_CHARS) before they become one event.
COALESCE_S = 0.005
FLUSH_CHARS = 1 << 16
# A worker that dies before it is ready this many times in a row is started again only on demand.
MAX_FAILED_STARTS = 3
# After the worker closes its control pipe, how long to wait for its exit status before declaring it broken.
CONTROL_LOST_WAIT_S = 0.2


class Exec:
    """The running exec (a plain class: `dataclasses` costs boot time under TCG)."""

    def __init__(
        self,
        channel: HostChannel,
        request_id: int,
        language: str,
        source: Child,
        sink: OutputSink,
        timeout_s: float | None,
        grace_s: float,
        started: float,
    ) -> None:
        self.channel = channel
        self.request_id = request_id
        self.language = language
        self.source = source  # the worker or the bash process whose output and completion are this exec's
        self.sink = sink
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.started = started
        self.timed_out = False
        self.worker_request = b""  # the exec request as sent to (or held for) the worker
        self.env_request = b""  # its envs, sent just before it (held and cancelled with it)
        self.earlier_loss: str | None = None  # the worker died while idle before this exec: a new namespace


class Agent:
    def __init__(self, loop: Loop, *, die_with_agent: bool, pid1: bool, code_user: CodeUser | None = None) -> None:
        self._loop = loop
        self._user = code_user  # None: user code runs as the agent's own user (root)
        self._die_with_agent = die_with_agent
        self._pid1 = pid1
        self._channels: list[HostChannel] = []
        self._worker: WorkerProcess | None = None
        self._worker_requests: Outbox | None = None
        self._exec: Exec | None = None
        self._lost_note: str | None = None
        self._failed_starts = 0
        self._closing = False
        self._groups = codegroups.CodeGroups()
        self._envs: dict[str, str] = {}  # the sandbox's own (set_env): in guest memory only, never logged
        self._commands = commands.CommandTable(loop, self._groups, code_user, lambda: {**os.environ, **self._envs})
        self._ops = {
            "ping": self._op_ping,
            "exec": self._op_exec,
            "interrupt": self._op_interrupt,
            "reseed": self._op_reseed,
            "set_clock": self._op_set_clock,
            "restart_worker": self._op_restart_worker,
            **dict.fromkeys(protocol.NET_OPS, self._op_net),
            **dict.fromkeys(fileops.HANDLERS, self._op_file),
            **dict.fromkeys(commands.OPS, self._op_command),
            "set_env": self._op_set_env,
        }

    # -- lifecycle -----------------------------------------------------------------------------------------

    def attach(self, read_fd: int, write_fd: int, *, reconnecting: bool) -> None:
        """Serve one more host channel. Every channel may send any request; there is one worker and one
        exec at a time for all of them, and an exec's events go to the channel that asked for it."""
        channel = HostChannel(
            self._loop,
            read_fd,
            write_fd,
            reconnecting=reconnecting,
            on_line=lambda line, payload: self._on_line(channel, line, payload),
            on_bad_stream=lambda reason: self._send_error(channel, 0, ErrorCode.BAD_REQUEST, reason),
            on_connect=lambda: self._hello(channel),
            on_closed=lambda gone: self._channel_closed(channel, gone),
        )
        self._channels.append(channel)

    def run(self) -> None:
        self._install_signals()
        if self._pid1:  # only in a guest: on a host the agent must not touch the host's cgroups
            why = self._groups.setup()
            if why is not None:
                sysops.log(why)
            if self._user is not None:  # the user's files live in /data (the working directory of its code)
                try:
                    os.chown(sysops.DATA_DIR, self._user.uid, self._user.gid)
                except OSError as exc:
                    sysops.log(f"cannot give {sysops.DATA_DIR} to {self._user.name}: {exc}")
        for channel in self._channels:
            channel.start()
            self._hello(channel)
        try:
            self._start_worker()
        except OSError as exc:  # the next exec tries again and reports the error
            sysops.log(f"cannot start the worker: {exc}")
        try:
            self._loop.run()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._loop.stopped = True

    def _channel_closed(self, channel: HostChannel, gone: bool) -> None:
        """A test's channel ended (a virtio port never does). When the last such one has: stop now if nobody
        listens, else once the running exec is done."""
        channel.closed = True
        if not all(other.closed for other in self._channels if not other.reconnecting):
            return
        self._closing = True
        if gone or self._exec is None:
            self.stop()

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        # Python-level handlers that do nothing: the C handler writes the signal number to the wake-up pipe,
        # and the loop acts on it there, outside of any handler.
        signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if self._pid1 else _ignore_signal)
        if self._pid1:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._loop.set_reader(read_fd, lambda: self._on_signals(read_fd))

    def _on_signals(self, read_fd: int) -> None:
        try:
            numbers = os.read(read_fd, 512)
        except BlockingIOError:
            return
        if signal.SIGTERM in numbers and not self._pid1:
            self.stop()
        self._reap()

    def _shutdown(self) -> None:
        if self._worker is not None:
            sysops.kill_group(self._worker.pid)
        if self._exec is not None and self._exec.language == "bash":
            sysops.kill_group(self._exec.source.pid)
        self._commands.kill_all()
        for channel in self._channels:
            channel.close()

    @staticmethod
    def _hello(channel: HostChannel) -> None:
        channel.send(protocol.event(0, "hello", protocol=protocol.PROTOCOL_VERSION, agent_version=AGENT_VERSION))

    # -- host messages -------------------------------------------------------------------------------------

    @staticmethod
    def _send_error(channel: HostChannel, request_id: int, code: str, message: str) -> None:
        channel.send(protocol.event(request_id, "error", code=code, message=message))

    def _on_line(self, channel: HostChannel, line: bytes, payload: bytes | None = None) -> None:
        try:
            message = protocol.decode(line)
        except protocol.ProtocolError as exc:
            self._send_error(channel, 0, ErrorCode.BAD_REQUEST, str(exc))
            return
        if payload is not None:
            message[frames.PAYLOAD_KEY] = payload
        request_id = message["id"]
        op = message.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            if "op" in message:
                self._send_error(channel, request_id, ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")
            else:
                self._send_error(channel, request_id, ErrorCode.BAD_REQUEST, "a request needs an 'op'")
            return
        try:
            handler(channel, request_id, message)
        except BadRequest as exc:
            self._send_error(channel, request_id, ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:
            sysops.log(f"internal error serving {op}:\n{sysops.format_exc()}")
            self._send_error(channel, request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _op_file(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        """File operations run here, between events: they are quick, bounded I/O on the guest's RAM disk."""
        try:
            if self._user is None:
                reply, data = fileops.HANDLERS[message["op"]](message)
            else:
                with self._user.acting():
                    reply, data = fileops.HANDLERS[message["op"]](message)
        except files.FileOpError as exc:
            self._send_error(channel, request_id, exc.code, exc.message)
            return
        channel.send_encoded(frames.encode(protocol.event(request_id, "ok", **reply), data))

    def _op_command(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        """Commands beside the REPL (commands.py): answered at once, also while an exec runs."""
        try:
            reply, data = self._commands.handle(message)
        except commands.CommandError as exc:
            self._send_error(channel, request_id, exc.code, exc.message)
            return
        channel.send_encoded(frames.encode(protocol.event(request_id, "ok", **reply), data))

    def _op_set_env(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        try:
            wanted = envs.check(message.get("envs"))
        except envs.EnvError as exc:
            raise BadRequest(str(exc)) from None
        if len(self._envs.keys() | wanted.keys()) > envs.MAX_VARS:
            raise BadRequest(f"a sandbox has at most {envs.MAX_VARS} variables of its own")
        self._envs.update(wanted)
        # Queued behind a running exec, if any, like a reseed; a restarted worker gets them at its start.
        self._to_worker(_worker_request({"op": "env", "set": wanted}))
        channel.send(protocol.event(request_id, "ok", names=sorted(self._envs)))

    def _op_ping(self, channel: HostChannel, request_id: int, _message: dict[str, Any]) -> None:
        channel.send(
            protocol.event(
                request_id,
                "pong",
                protocol=protocol.PROTOCOL_VERSION,
                agent_version=AGENT_VERSION,
                worker_pid=self._worker.pid if self._worker is not None else None,
            )
        )

    def _op_interrupt(self, channel: HostChannel, request_id: int, _message: dict[str, Any]) -> None:
        running = self._exec
        if running is not None and not self._cancel_unstarted(running):
            if running.language == "bash":
                sysops.kill_group(running.source.pid, signal.SIGINT)
            else:
                sysops.signal_process(running.source.pid, signal.SIGINT)
        channel.send(protocol.event(request_id, "ok"))

    def _op_reseed(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        seed = arguments.seed(message)
        sysops.reseed_kernel(seed)
        # Queued behind a running exec, if any: the worker reseeds before it runs the next one.
        self._to_worker(_worker_request({"op": "reseed", "seed_hex": seed.hex()}))
        channel.send(protocol.event(request_id, "ok"))

    def _op_set_clock(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        unix_ns = arguments.unix_ns(message)
        try:
            sysops.set_clock(unix_ns)
        except (OSError, OverflowError) as exc:
            self._send_error(channel, request_id, ErrorCode.INTERNAL, f"cannot set the clock: {exc}")
            return
        channel.send(protocol.event(request_id, "ok"))

    def _op_net(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        from appliance_agent import netconfig  # first use only: its imports cost boot time under TCG

        try:
            reply = netconfig.HANDLERS[message["op"]](message)
        except (netconfig.NetConfigError, OSError) as exc:
            self._send_error(channel, request_id, ErrorCode.INTERNAL, f"{message['op']} failed: {exc}")
            return
        channel.send(protocol.event(request_id, "ok", **reply))

    def _op_restart_worker(self, channel: HostChannel, request_id: int, _message: dict[str, Any]) -> None:
        if self._worker is not None:
            text = "the Python process was restarted on request; its state is lost"
            self._replace_worker(self._worker, "WorkerExited", text, text)
        else:
            self._start_worker()
        self._lost_note = None
        channel.send(protocol.event(request_id, "ok"))

    def _op_exec(self, channel: HostChannel, request_id: int, message: dict[str, Any]) -> None:
        if self._exec is not None:
            self._send_error(channel, request_id, ErrorCode.BUSY, f"exec {self._exec.request_id} is still running")
            return
        args = ExecArgs(message)
        language, timeout_s = args.language, args.timeout_s
        started = time.monotonic()
        source: Child
        if language == "bash":
            try:
                source = children.start_bash(args.code, self._groups.procs_file(codegroups.BASH), self._user,
                                             {**self._envs, **args.envs})
            except OSError as exc:
                self._send_error(channel, request_id, ErrorCode.INTERNAL, f"cannot start bash: {exc}")
                return
            self._watch_output(source)
        else:
            if self._worker is None:
                self._start_worker()
            assert self._worker is not None
            source = self._worker
        self._exec = Exec(
            channel, request_id, language, source, OutputSink(args.output_cap), timeout_s, args.grace_s, started
        )
        if language == "python":
            self._exec.earlier_loss, self._lost_note = self._lost_note, None
            self._exec.worker_request = exec_request(args.code)
            if args.envs:  # for this exec only: the worker sets them before the cell and restores them after
                self._exec.env_request = _worker_request({"op": "exec_env", "set": args.envs})
                self._to_worker(self._exec.env_request)
            self._to_worker(self._exec.worker_request)
        if timeout_s is not None:
            self._loop.call_later("timeout", timeout_s, self._on_timeout)

    # -- the running exec ----------------------------------------------------------------------------------

    def _finish(
        self,
        running: Exec,
        *,
        value: Any = None,
        error: dict[str, str] | None = None,
        exit_code: int | None = None,
        restarted: bool = False,
        worker_exit: str | None = None,
    ) -> None:
        self._flush_output()
        for stream, text in running.sink.close():
            running.channel.send(protocol.event(running.request_id, stream, data=text))
        if running.earlier_loss and not restarted:
            restarted, worker_exit = True, running.earlier_loss
        self._exec = None
        for key in ("timeout", "grace", "flush"):
            self._loop.cancel(key)
        duration_s = round(time.monotonic() - running.started, 6)
        if value is None and error is None and exit_code is None and not restarted and not running.sink.dropped:
            running.channel.send_encoded(protocol.encode_quiet_done(running.request_id, duration_s))
        else:
            self._send_done(running, value, error, exit_code, restarted, worker_exit, duration_s)
        if self._closing:
            self.stop()

    @staticmethod
    def _send_done(
        running: Exec,
        value: Any,
        error: dict[str, str] | None,
        exit_code: int | None,
        restarted: bool,
        worker_exit: str | None,
        duration_s: float,
    ) -> None:
        running.channel.send(
            protocol.event(
                running.request_id,
                "done",
                value=value,
                error=error,
                exit_code=exit_code,
                truncated_bytes=running.sink.dropped,
                worker_restarted=restarted,
                worker_exit=worker_exit,
                duration_s=duration_s,
            )
        )

    def _to_worker(self, data: bytes) -> None:
        """Send a request to the worker; until it is ready, hold it (see _cancel_unstarted)."""
        worker = self._worker
        if worker is None or self._worker_requests is None:
            return
        if worker.ready:
            self._worker_requests.send(data)
        else:
            worker.held.append(data)

    def _cancel_unstarted(self, running: Exec) -> bool:
        """End an exec whose request still waits for a starting worker: nothing ran, so nothing to interrupt.

        A worker between its start and its SIGINT handler would die of the interrupt (or, ignoring it,
        run the cell regardless): so no request reaches it before it reports ready.
        """
        worker = self._worker
        if running.language != "python" or worker is None or running.source is not worker:
            return False
        if not any(data is running.worker_request for data in worker.held):
            return False
        worker.held = [data for data in worker.held
                       if data is not running.worker_request and data is not running.env_request]
        if running.timed_out:
            timeout = _seconds(running.timeout_s or 0)
            error = error_result("TimeoutError", f"execution exceeded {timeout} s before the Python process was ready")
        else:
            error = {"name": "KeyboardInterrupt", "value": "", "traceback": "KeyboardInterrupt\n"}
        self._finish(running, error=error)
        return True

    def _on_timeout(self) -> None:
        running = self._exec
        if running is None:
            return
        running.timed_out = True
        if self._cancel_unstarted(running):
            return
        if running.language == "bash":
            sysops.kill_group(running.source.pid)  # the exit status arrives through SIGCHLD
            self._groups.kill(codegroups.BASH, self._reap)  # and whatever left its process group
        else:
            sysops.signal_process(running.source.pid, signal.SIGINT)
            self._loop.call_later("grace", running.grace_s, self._on_grace)

    def _on_grace(self) -> None:
        running = self._exec
        worker = self._worker
        if running is None or running.language != "python" or worker is None:
            return
        self._read_control(worker)  # the worker may have answered just now
        if self._exec is not running:
            return
        grace = _seconds(running.grace_s)
        text = f"the Python process was killed after ignoring the interrupt for {grace} s; its state is lost"
        value = (
            f"execution exceeded {_seconds(running.timeout_s or 0)} s and did not stop within {grace} s of "
            "the interrupt; the Python process was killed and its state is lost"
        )
        self._replace_worker(worker, "TimeoutError", value, text)

    def _flush_output(self) -> None:
        self._loop.cancel("flush")
        running = self._exec
        if running is None:
            return
        for stream, text in running.sink.take():
            running.channel.send(protocol.event(running.request_id, stream, data=text))

    # -- output pipes --------------------------------------------------------------------------------------

    def _watch_output(self, child: Child) -> None:
        self._loop.set_reader(child.stdout, lambda: self._on_output(child, child.stdout, "stdout"))
        self._loop.set_reader(child.stderr, lambda: self._on_output(child, child.stderr, "stderr"))

    def _on_output(self, child: Child, fd: int, stream: str) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._output_eof(child, fd)
            return
        running = self._exec
        if running is None or running.source is not child:
            return  # output nobody waits for (a background job, a retired process)
        running.sink.feed(stream, data)
        if running.sink.pending_chars >= FLUSH_CHARS:
            self._flush_output()
        elif running.sink.pending_chars and not self._loop.has_timer("flush"):
            self._loop.call_later("flush", COALESCE_S, self._flush_output)

    def _drain(self, child: Child, polled: bool = False) -> None:
        """Read exactly what is in the child's output pipes now: everything it wrote before it reported.

        polled: called for a control message from the current poll; a pipe that poll did not report
        readable holds nothing older than that message, so it is not even asked (saves two system calls
        per exec, which matter under TCG).
        """
        for fd, stream in ((child.stdout, "stdout"), (child.stderr, "stderr")):
            if fd in child.at_eof or (polled and not self._loop.reported_readable(fd)):
                continue
            available = sysops.bytes_available(fd)
            while available > 0:
                try:
                    data = os.read(fd, available)
                except OSError:
                    break
                if not data:
                    break
                available -= len(data)
                running = self._exec
                if running is not None and running.source is child:
                    running.sink.feed(stream, data)

    def _output_eof(self, child: Child, fd: int) -> None:
        self._loop.forget(fd)
        child.at_eof.add(fd)
        if child.retired:
            os.close(fd)

    def _retire(self, child: Child) -> None:
        child.retired = True
        for fd in (child.stdout, child.stderr):
            if fd in child.at_eof:
                os.close(fd)

    # -- children ------------------------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            running = self._exec
            if self._worker is not None and pid == self._worker.pid:
                self._worker_died(self._worker, status)
            elif running is not None and running.language == "bash" and pid == running.source.pid:
                self._bash_exited(running, status)
            elif self._commands.on_exit(pid, status):
                pass
            # Anything else is an orphan of user code, adopted by PID 1 (or a retired child): now collected.

    def _bash_exited(self, running: Exec, status: int) -> None:
        self._drain(running.source)
        code = os.waitstatus_to_exitcode(status)
        error = None
        if running.timed_out:
            error = error_result("TimeoutError",
                                 f"bash command exceeded {_seconds(running.timeout_s or 0)} s and was killed")
        elif code > 0:
            error = error_result("CalledProcessError", f"bash exited with code {code}")
        elif code < 0:
            error = error_result("CalledProcessError", f"bash {sysops.describe_status(status)}")
        self._finish(running, error=error, exit_code=code)
        self._retire(running.source)

    def _start_worker(self) -> None:
        worker = children.start_worker(die_with_agent=self._die_with_agent, user=self._user,
                                       cgroup_procs=self._groups.procs_file(codegroups.WORKER),
                                       extra_env=self._envs)
        self._worker = worker
        self._worker_requests = Outbox(self._loop, worker.requests)
        self._loop.set_reader(worker.control, lambda: self._on_control(worker))
        self._watch_output(worker)

    def _on_control(self, worker: WorkerProcess) -> None:
        try:
            data = os.read(worker.control, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.set_reader(worker.control, None)
            self._loop.call_later(("control-lost", worker.pid), CONTROL_LOST_WAIT_S, lambda: self._control_lost(worker))
            return
        if data == DONE_QUIET and self._finish_quietly(worker):
            return
        self._handle_control(worker, data, polled=True)

    def _finish_quietly(self, worker: WorkerProcess) -> bool:
        """The usual end of an exec (no output, no value, no error, no timeout) on a short path: under TCG the
        cost of a wake-up grows with the amount of distinct code it runs. False if the general path is needed."""
        running = self._exec
        if (
            running is None
            or running.source is not worker
            or running.timed_out
            or running.earlier_loss
            or not running.sink.quiet
            or not worker.control_reader.empty
            or not self._loop.only_ready(worker.control)  # output in the same poll must be drained first
        ):
            return False
        self._exec = None
        self._loop.cancel("timeout")  # "grace" follows a timeout and "flush" output: neither is set
        duration_s = round(time.monotonic() - running.started, 6)
        running.channel.send_encoded(protocol.encode_quiet_done(running.request_id, duration_s))
        if self._closing:
            self.stop()
        return True

    def _read_control(self, worker: WorkerProcess) -> None:
        """Handle whatever the worker has written to its control pipe and the loop has not seen yet."""
        while True:
            try:
                data = os.read(worker.control, READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self._handle_control(worker, data, polled=False)

    def _handle_control(self, worker: WorkerProcess, data: bytes, polled: bool) -> None:
        try:
            lines = worker.control_reader.feed(data)
        except protocol.ProtocolError:
            worker.control_reader = protocol.LineReader()
            return
        for line in lines:
            if line == _DONE_QUIET_LINE:  # most execs: skip the JSON parser
                self._on_worker_message(worker, _DONE_QUIET, polled)
                continue
            try:
                message = json.loads(line)
            except ValueError:
                sysops.log(f"unreadable message from the worker: {line[:80]!r}")
                continue
            self._on_worker_message(worker, message, polled)

    def _on_worker_message(self, worker: WorkerProcess, message: dict[str, Any], polled: bool) -> None:
        event = message.get("ev")
        if event == "ready":
            worker.ready = True
            self._failed_starts = 0
            if self._worker is worker and self._worker_requests is not None:
                for data in worker.held:
                    self._worker_requests.send(data)
            worker.held.clear()
            return
        running = self._exec
        if running is not None and running.source is worker:
            self._drain(worker, polled)
            if event == "display":
                self._flush_output()
                running.channel.send(protocol.event(running.request_id, "display", data=message.get("data")))
        if event == "display" and message.get("seq") is not None:
            # The cell waits for this before it goes on, so its next output cannot overtake the display.
            self._to_worker(_worker_request({"op": "ack", "seq": message["seq"]}))
        if running is None or running.source is not worker:
            return
        if event == "done":
            error = message.get("error")
            if running.timed_out and error and error.get("name") == "KeyboardInterrupt":
                error = {
                    "name": "TimeoutError",
                    "value": f"execution exceeded {_seconds(running.timeout_s or 0)} s and was interrupted; "
                    "the namespace is kept",
                    "traceback": error.get("traceback", ""),
                }
            self._finish(running, value=message.get("value"), error=error)

    def _worker_died(self, worker: WorkerProcess, status: int) -> None:
        self._read_control(worker)  # what it reported before it died still counts
        text = f"the Python process {sysops.describe_status(status)}; its state is lost"
        running = self._exec
        if running is not None and running.source is worker:
            self._drain(worker)
            self._finish(running, error=error_result("WorkerExited", text), restarted=True, worker_exit=text)
        else:
            self._lost_note = text
            sysops.log(text)
        if not worker.ready:
            self._failed_starts += 1
        self._drop_worker(worker)
        self._groups.kill(codegroups.WORKER, self._reap)  # its orphans, setsid or not: the state is gone anyway
        if self._failed_starts < MAX_FAILED_STARTS:
            self._start_worker()
        else:
            sysops.log(f"the worker failed to start {self._failed_starts} times; next attempt on demand")

    def _control_lost(self, worker: WorkerProcess) -> None:
        if self._worker is worker:  # still not reaped: it lives, but can no longer report
            text = "the Python process closed its control channel and was restarted; its state is lost"
            self._replace_worker(worker, "WorkerExited", text, text)

    def _replace_worker(self, worker: WorkerProcess, error_name: str, error_value: str, text: str) -> None:
        """Kill the worker (and its process group), end its exec if one runs, start a fresh one."""
        sysops.kill_group(worker.pid)
        running = self._exec
        if running is not None and running.source is worker:
            self._drain(worker)
            self._finish(running, error=error_result(error_name, error_value), restarted=True, worker_exit=text)
        else:
            self._lost_note = text
        self._drop_worker(worker)
        self._groups.kill(codegroups.WORKER, self._reap)
        self._start_worker()

    def _drop_worker(self, worker: WorkerProcess) -> None:
        self._loop.cancel(("control-lost", worker.pid))
        if self._worker is worker and self._worker_requests is not None:
            self._worker_requests.discard()
        for fd in (worker.control, worker.requests):
            self._loop.forget(fd)
            os.close(fd)
        self._retire(worker)
        if self._worker is worker:
            self._worker = None
            self._worker_requests = None


def _ignore_signal(_signum: int, _frame: Any) -> None:
    pass


_WORKER_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DONE_QUIET_LINE = DONE_QUIET.rstrip(b"\n")
_DONE_QUIET: dict[str, Any] = json.loads(DONE_QUIET)


def _worker_request(message: dict[str, Any]) -> bytes:
    return _WORKER_ENCODER.encode(message).encode("ascii") + b"\n"

"""Commands: programs the host starts beside the REPL (issue 15), each with a handle the host addresses later.

The agent starts a command as the code user (setpriv, as bash execs), in a process group and a cgroup of its own
(codegroups.COMMANDS: a timed-out bash exec kills its own group, never a command), with stdin a pipe the host can
write to and stdout/stderr read into a bounded ring per command (ring.py). Commands never touch the REPL worker:
the worker's one-exec-at-a-time rule does not apply to them, and a running exec does not delay them.

Ops (requests, host -> agent; answers are ok {...} or error {code, message}):
    cmd_start  {argv: [str] | shell: str, cwd, envs, timeout_s}  -> ok {command_id, pid}
    cmd_list                                                     -> ok {commands: [status]}
    cmd_status {command_id}                                      -> ok {status}
    cmd_read   {command_id, offset, max}                         -> ok {chunks: [[stream, text]], offset,
                                                                       next_offset, dropped_bytes, status}
    cmd_stdin  {command_id, eof} + payload (frames.py)           -> ok {written}
    cmd_signal {command_id, signal}                              -> ok {status}
A status is {command_id, pid, running, exit_code, signal, timed_out, cmd, output_bytes, dropped_bytes}.
Error codes: not_found (no such command), too_many (MAX_RUNNING commands run), bad_request, internal.
Every bound is checked here again (the host is trusted to send sane frames, but nothing depends on it).
"""

from __future__ import annotations

import os
import signal

from appliance_agent import children, codegroups, envs, sysops
from appliance_agent.arguments import BadRequest, is_int, number
from appliance_agent.channel import Outbox
from appliance_agent.frames import PAYLOAD_KEY
from appliance_agent.ring import OutputRing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from appliance_agent.codeuser import CodeUser
    from appliance_agent.loop import Loop

OPS = ("cmd_start", "cmd_list", "cmd_status", "cmd_read", "cmd_stdin", "cmd_signal")
MAX_RUNNING = 16  # commands running at once per sandbox
MAX_KEPT = 64  # commands remembered (running or finished); the oldest finished one is forgotten first
RING_BYTES = 1 << 20  # output kept per command
MAX_READ = 1 << 20  # bytes per cmd_read
MAX_ARGS = 1024
MAX_CMD_BYTES = 256 << 10  # argv or shell line, UTF-8
MAX_STDIN = 1 << 20  # one cmd_stdin payload
MAX_STDIN_PENDING = 4 << 20  # written but not yet taken by the program
MAX_CWD_BYTES = 4096
MAX_TIMEOUT_S = 7 * 86400.0
READ_SIZE = 1 << 16
SIGNALS = {name: getattr(signal, name) for name in
           ("SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT")}
# Run the program in its working directory: `cd` as the code user, so a directory it may not enter is refused.
_CD_THEN_EXEC = 'cd -- "$1" || exit 126; shift; exec "$@"'


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StartArgs:
    """The checked arguments of cmd_start (a plain class: `dataclasses` costs boot time under TCG)."""

    def __init__(self, message: dict[str, Any]) -> None:
        argv, shell = message.get("argv"), message.get("shell")
        if (argv is None) == (shell is None):
            raise BadRequest("give exactly one of argv (a list of strings) or shell (a string)")
        if argv is not None:
            if not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS:
                raise BadRequest(f"argv must be a list of 1 to {MAX_ARGS} strings")
            if not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
                raise BadRequest("argv must hold strings without NUL bytes")
            self.argv: list[str] = list(argv)
        else:
            if not isinstance(shell, str) or not shell or "\0" in shell:
                raise BadRequest("shell must be a non-empty string without NUL bytes")
            self.argv = ["/bin/bash", "-c", shell]
        try:
            size = sum(len(arg.encode("utf-8")) + 1 for arg in self.argv)
        except UnicodeEncodeError:
            raise BadRequest("the command is not valid Unicode text") from None
        if size > MAX_CMD_BYTES:
            raise BadRequest(f"the command is longer than {MAX_CMD_BYTES} bytes")
        cwd = message.get("cwd")
        if cwd is None:
            cwd = os.getcwd()  # the agent's: /data in the guest (sysops.prepare_process)
        if not isinstance(cwd, str) or not cwd or "\0" in cwd or len(cwd.encode("utf-8", "replace")) > MAX_CWD_BYTES:
            raise BadRequest(f"cwd must be a path of 1 to {MAX_CWD_BYTES} bytes without NUL bytes")
        self.cwd: str = cwd
        try:
            self.envs = envs.check(message.get("envs"))
        except envs.EnvError as exc:
            raise BadRequest(str(exc)) from None
        self.timeout_s = number(message, "timeout_s", None, allow_zero=False)
        if self.timeout_s is not None and self.timeout_s > MAX_TIMEOUT_S:
            raise BadRequest(f"timeout_s must be at most {MAX_TIMEOUT_S:g}")
        self.display = shell if shell is not None else " ".join(self.argv)


class Command:
    def __init__(self, command_id: str, pid: int, child: children.Child, stdin: int, loop: Loop, display: str) -> None:
        self.command_id = command_id
        self.pid = pid
        self.child = child
        self.stdin_fd: int | None = stdin
        self.stdin = Outbox(loop, stdin, on_error=lambda _exc: None)
        self.ring = OutputRing(RING_BYTES)
        self.exit_status: int | None = None
        self.timed_out = False
        self.display = display[:200]

    @property
    def running(self) -> bool:
        return self.exit_status is None

    def status(self) -> dict[str, Any]:
        exit_code = signal_name = None
        if self.exit_status is not None:
            exit_code = os.waitstatus_to_exitcode(self.exit_status)
            if exit_code < 0:
                signal_name = sysops.signal_name(-exit_code)
        return {
            "command_id": self.command_id,
            "pid": self.pid,
            "running": self.running,
            "exit_code": exit_code,
            "signal": signal_name,
            "timed_out": self.timed_out,
            "cmd": self.display,
            "output_bytes": self.ring.end,
            "dropped_bytes": self.ring.dropped,
        }


class CommandTable:
    """The sandbox's commands. `base_env` gives the environment a new program starts from (the agent's, with the
    sandbox's envs); `reap` is the agent's reaper (cgroup kills wait for it)."""

    def __init__(self, loop: Loop, groups: codegroups.CodeGroups, user: CodeUser | None,
                 base_env: Callable[[], dict[str, str]]) -> None:
        self._loop = loop
        self._groups = groups
        self._user = user
        self._base_env = base_env
        self._commands: dict[str, Command] = {}
        self._by_pid: dict[int, Command] = {}
        self._counter = 0

    def handle(self, message: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        op = message["op"]
        if op == "cmd_start":
            return self._start(StartArgs(message)), b""
        if op == "cmd_list":
            return {"commands": [command.status() for command in self._commands.values()]}, b""
        command = self._find(message)
        if op == "cmd_status":
            return {"status": command.status()}, b""
        if op == "cmd_read":
            return self._read(command, message), b""
        if op == "cmd_stdin":
            return self._stdin(command, message), b""
        if op == "cmd_signal":
            return self._signal(command, message), b""
        raise BadRequest(f"unknown command op {op!r}")

    # -- ops -----------------------------------------------------------------------------------------------

    def _start(self, args: StartArgs) -> dict[str, Any]:
        running = sum(1 for command in self._commands.values() if command.running)
        if running >= MAX_RUNNING:
            raise CommandError("too_many", f"{MAX_RUNNING} commands are running in this sandbox; wait for one to "
                                           "end or signal it")
        self._forget_finished(MAX_KEPT - 1)
        if len(self._commands) >= MAX_KEPT:
            raise CommandError("too_many", f"this sandbox keeps {MAX_KEPT} commands and all are running")
        env = {**self._base_env(), **args.envs}
        argv = ["/bin/bash", "-c", _CD_THEN_EXEC, "command", args.cwd, *args.argv]
        if self._user is not None:
            argv = [children.SETPRIV, f"--reuid={self._user.uid}", f"--regid={self._user.gid}", "--clear-groups",
                    "--", *argv]
            env = self._user.environment(env)
        stdin_read, stdin_write = os.pipe()
        out_read, out_write = children.pipe()
        err_read, err_write = children.pipe()
        try:
            pid = children.spawn(argv, (stdin_read, out_write, err_write),
                                 cgroup_procs=self._groups.procs_file(codegroups.COMMANDS), env=env)
        except OSError as exc:
            for fd in (stdin_write, out_read, err_read):
                os.close(fd)
            raise CommandError("internal", f"cannot start the command: {exc}") from None
        finally:
            for fd in (stdin_read, out_write, err_write):
                os.close(fd)
        os.set_blocking(stdin_write, False)
        self._counter += 1
        command_id = f"cmd-{self._counter}"
        command = Command(command_id, pid, children.Child(pid, out_read, err_read), stdin_write, self._loop,
                          args.display)
        self._commands[command_id] = command
        self._by_pid[pid] = command
        for fd, stream in ((out_read, "stdout"), (err_read, "stderr")):
            self._loop.set_reader(fd, lambda fd=fd, stream=stream: self._on_output(command, fd, stream))
        if args.timeout_s is not None:
            self._loop.call_later(("cmd-timeout", command_id), args.timeout_s, lambda: self._on_timeout(command))
        return {"command_id": command_id, "pid": pid}

    def _read(self, command: Command, message: dict[str, Any]) -> dict[str, Any]:
        offset, limit = message.get("offset", 0), message.get("max", MAX_READ)
        if not is_int(offset) or offset < 0:
            raise BadRequest("offset must be a non-negative integer")
        if not is_int(limit) or not 1 <= limit <= MAX_READ:
            raise BadRequest(f"max must be an integer from 1 to {MAX_READ}")
        self._drain(command)  # what the program wrote up to now, even if the loop has not polled it yet
        pieces, first, next_offset, skipped = command.ring.read(offset, limit)
        return {"chunks": [list(piece) for piece in pieces], "offset": first, "next_offset": next_offset,
                "dropped_bytes": skipped, "status": command.status()}

    def _stdin(self, command: Command, message: dict[str, Any]) -> dict[str, Any]:
        data = message.get(PAYLOAD_KEY, b"")
        eof = message.get("eof", False)
        if not isinstance(eof, bool):
            raise BadRequest("eof must be true or false")
        if len(data) > MAX_STDIN:
            raise BadRequest(f"one stdin write is at most {MAX_STDIN} bytes")
        if command.stdin_fd is None:
            if data:
                raise CommandError("conflict", "the command's stdin is closed")
            return {"written": 0}
        if command.stdin.on_drained is not None:
            raise CommandError("conflict", "the command's stdin is being closed")
        if command.stdin.pending + len(data) > MAX_STDIN_PENDING:
            raise CommandError("too_many", f"the command has not read {command.stdin.pending} bytes of its stdin yet")
        if data:
            command.stdin.send(bytes(data))
        if eof:  # once what is pending has been taken: the program reads all of it before end-of-file
            if command.stdin.pending:
                command.stdin.on_drained = lambda: self._close_stdin(command)
            else:
                self._close_stdin(command)
        return {"written": len(data)}

    def _signal(self, command: Command, message: dict[str, Any]) -> dict[str, Any]:
        name = message.get("signal")
        if not isinstance(name, str) or name not in SIGNALS:
            raise BadRequest(f"signal must be one of {', '.join(SIGNALS)}")
        if command.running:
            sysops.kill_group(command.pid, SIGNALS[name])
        return {"status": command.status()}

    # -- events --------------------------------------------------------------------------------------------

    def on_exit(self, pid: int, status: int) -> bool:
        """A child ended: True if it was a command (its status is kept; output still in its pipes is read)."""
        command = self._by_pid.pop(pid, None)
        if command is None:
            return False
        command.exit_status = status
        self._loop.cancel(("cmd-timeout", command.command_id))
        self._drain(command)
        self._close_stdin(command)
        return True

    def _on_output(self, command: Command, fd: int, stream: str) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.forget(fd)
            command.child.at_eof.add(fd)
            os.close(fd)
            return
        command.ring.append(stream, data)

    def _drain(self, command: Command) -> None:
        child = command.child
        for fd, stream in ((child.stdout, "stdout"), (child.stderr, "stderr")):
            if fd in child.at_eof:
                continue
            available = sysops.bytes_available(fd)
            while available > 0:
                try:
                    data = os.read(fd, min(available, READ_SIZE))
                except OSError:
                    break
                if not data:
                    break
                available -= len(data)
                command.ring.append(stream, data)

    def _on_timeout(self, command: Command) -> None:
        if command.running:
            command.timed_out = True
            sysops.kill_group(command.pid)

    def _close_stdin(self, command: Command) -> None:
        if command.stdin_fd is None:
            return
        command.stdin.discard()
        self._loop.forget(command.stdin_fd)
        os.close(command.stdin_fd)
        command.stdin_fd = None

    def _forget_finished(self, keep: int) -> None:
        for command_id in [key for key, command in self._commands.items() if not command.running]:
            if len(self._commands) <= keep:
                return
            command = self._commands.pop(command_id)
            child = command.child
            for fd in (child.stdout, child.stderr):
                if fd not in child.at_eof:  # a program it left behind still holds the pipe: stop reading it
                    self._loop.forget(fd)
                    os.close(fd)

    def _find(self, message: dict[str, Any]) -> Command:
        command_id = message.get("command_id")
        if not isinstance(command_id, str) or len(command_id) > 64:
            raise BadRequest("command_id must be a command's id")
        command = self._commands.get(command_id)
        if command is None:
            raise CommandError("not_found", f"no command {command_id!r} in this sandbox")
        return command

    def kill_all(self) -> None:
        for command in self._commands.values():
            if command.running:
                sysops.kill_group(command.pid)

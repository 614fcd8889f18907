"""The host <-> guest agent wire protocol, version 1. Imported by both ends; standard library only.

Transport: a byte stream (virtio-serial port in the guest, a unix socket on the host). Each message is one
JSON object encoded as UTF-8 on a single line ending in b"\\n". json.dumps never emits a raw newline, and
every string is text: bytes that are not valid UTF-8 (a program's output) are decoded with "replace" before
they are put into a message, so no input can break the framing.

Requests go host -> agent and carry an integer "id" chosen by the host and an "op":
    ping                                      -> pong {protocol, agent_version, worker_pid}
    exec   {code, language, timeout_s,        -> stdout/stderr/display events, then done
            grace_s, output_cap}
    interrupt                                 -> ok (KeyboardInterrupt in the running code, if any)
    reseed {seed_hex}                         -> ok (kernel CRNG, Python `random`, numpy in the worker)
    set_clock {unix_ns}                       -> ok (CLOCK_REALTIME)
    restart_worker                            -> ok (a fresh namespace)
    net_config {mac, address, gateway, hosts} -> ok {interface, mac, address, loaded} (netconfig.py: loads the
                                                 NIC driver, sets MAC, address/prefix and default route,
                                                 writes {name: ip} hosts to /etc/hosts; again on a clone)
    net_prepare                               -> ok {loaded} (the NIC driver loaded but not bound: no interface;
                                                 a later net_config only binds it. Done once in templates)
    file_write {path, append, upload} + bytes -> ok {size}; file_read {path, offset, max} -> ok {size, eof} + bytes
    list_dir {path, limit, after, depth}      -> ok {entries, more, after}   (files.py; FILE_OPS in fileops.py)
Events go agent -> host and carry the "id" of the request they answer and an "ev". The agent sends one
unsolicited event with id 0 when it starts: hello {protocol, agent_version}.

An exec answers with any number of
    stdout {data}      stderr {data}      display {data: mime bundle}
and exactly one final
    done {value: mime bundle | null, error: {name, value, traceback} | null, exit_code: int | null,
          truncated_bytes: int, worker_restarted: bool, worker_exit: str | null, duration_s: float}
A request the agent cannot serve is answered with error {code, message} (codes in ErrorCode).

How the agent fills these in (appliance_agent.agent):
- exec arguments: language defaults to "python"; timeout_s null or absent means no limit; grace_s and
  output_cap default to DEFAULT_GRACE_S and DEFAULT_OUTPUT_CAP. The cap counts stdout + stderr bytes; what is
  dropped is counted in truncated_bytes and announced by one last stderr event with TRUNCATION_MARKER.
- mime bundles: "text/plain" always (a capped repr), plus "text/html", "text/markdown", "image/svg+xml",
  "image/png" (base64), "image/jpeg" (base64), "text/latex" when the object offers them (_repr_*_ methods,
  matplotlib figures). Tracebacks name cells "<cell-N>" (N counts the worker's execs).
- error names beyond the code's own exceptions: "TimeoutError" (timeout_s passed; the namespace is kept
  unless worker_restarted), "WorkerExited" (the Python process died or was restarted during the exec),
  "CalledProcessError" (bash exited non-zero); exit_code is bash's status, negative for a signal.
- worker_restarted/worker_exit are also set on the first exec after the worker died while idle.
- hello is sent again each time a host connects to a port. The agent serves every port named
  AGENT_PORT_PREFIX<n>: any port may send any request, there is one worker and one exec at a time for all of
  them (busy), an exec's events go to the port that asked for it, and interrupt acts on whichever exec runs.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing `typing` costs the guest agent boot time under TCG
    from typing import Any

PROTOCOL_VERSION = 1
# The virtio-serial port names the agent serves in the guest (/dev/virtio-ports/<name>): one per host connection.
AGENT_PORT_PREFIX = "org.appliance.agent."
AGENT_PORT_NAME = AGENT_PORT_PREFIX + "0"


# The guest user of user code, chosen on the kernel command line (CODE_USER_ARG=root); the default is "sandbox".
CODE_USER_ARG = "appliance.code_user"
CODE_USERS = frozenset({"sandbox", "root"})
CODE_USER_ID = 1000  # uid and gid of `sandbox` (the image recipe creates it; appliance/build/rootfs.py)


def agent_port_name(port: int) -> str:
    return f"{AGENT_PORT_PREFIX}{port}"


# Default cap on stdout + stderr bytes kept per exec; the rest is dropped and counted.
DEFAULT_OUTPUT_CAP = 1 << 20
# Time between the interrupt at timeout and the kill of the worker, when the code ignores KeyboardInterrupt.
DEFAULT_GRACE_S = 2.0
TRUNCATION_MARKER = "\n[output truncated: {omitted} bytes omitted]\n"
MAX_DEPTH = 32  # of a message's nesting: results are MIME bundles and lists of them, never deep

NET_OPS = ("net_config", "net_prepare")  # served by netconfig.py, imported on first use
# Where the image builder puts the NIC's on-demand kernel modules (relative to the guest root), for net_prepare.
NETWORK_MODULES_DIR = "usr/lib/appliance/modules"
# A host name the guest accepts in its /etc/hosts, and so what a sandbox's network policy may name.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
# Commands beside the REPL (commands.py; cmd_stdin carries a raw payload) and the sandbox's environment:
#     set_env {envs}  -> ok {names}  (every later exec, command and restarted worker sees them; the running
#                                     worker's os.environ is updated before its next exec)
# exec also takes envs {name: value}: for that exec only (bash: its environment; python: os.environ during it).
CMD_OPS = ("cmd_start", "cmd_list", "cmd_status", "cmd_read", "cmd_stdin", "cmd_signal")
# file_write, file_read and list_dir carry raw payloads: see frames.py.
# Served by fileops.py (stat, remove, mkdir, rename; file_commit puts a finished upload in place) and filewatch.py.
FILE_OPS = ("file_commit", "file_stat", "file_remove", "file_mkdir", "file_rename", "watch_start", "watch_poll",
            "watch_stop")
OPS = frozenset(
    {"ping", "exec", "interrupt", "reseed", "set_clock", "restart_worker", "file_write", "file_read", "list_dir",
     *NET_OPS, *FILE_OPS, *CMD_OPS, "set_env"}
)
EVENTS = frozenset({"hello", "pong", "stdout", "stderr", "display", "done", "ok", "error"})
LANGUAGES = frozenset({"python", "bash"})


class ErrorCode:
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    BUSY = "busy"
    INTERNAL = "internal"
    NOT_FOUND = "not_found"  # commands: no such command id
    TOO_MANY = "too_many"  # commands: a cap is reached
    CONFLICT = "conflict"  # commands: the request does not fit the command's state (stdin closed)


class ProtocolError(ValueError):
    """A line that is not a valid protocol message."""


# One encoder for all messages: json.dumps with options builds a new JSONEncoder per call, which is
# measurable on the per-exec path under TCG.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line of UTF-8 JSON."""
    return _ENCODER.encode(message).encode("utf-8") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (with or without its newline) into a message; ProtocolError if it is not one."""
    try:
        message = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {line[:80]!r}") from exc
    except RecursionError:
        raise ProtocolError(f"nested too deeply: {line[:80]!r}") from None
    if nesting_depth(message) > MAX_DEPTH:
        raise ProtocolError(f"nested more than {MAX_DEPTH} levels: {line[:80]!r}")
    if not isinstance(message, dict) or not isinstance(message.get("id"), int):
        raise ProtocolError(f"not a message object with an integer id: {line[:80]!r}")
    if "op" not in message and "ev" not in message:
        raise ProtocolError(f"message has neither 'op' nor 'ev': {line[:80]!r}")
    return message


def nesting_depth(value: Any) -> int:
    """How deeply arrays and objects nest in parsed JSON, counted up to MAX_DEPTH + 1 (iteratively: a hostile
    message cannot exhaust the stack here). The API bounds client bodies with it too."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def request(request_id: int, op: str, **args: Any) -> dict[str, Any]:
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    return {"id": request_id, "op": op, **args}


def event(request_id: int, ev: str, **fields: Any) -> dict[str, Any]:
    if ev not in EVENTS:
        raise ProtocolError(f"unknown event {ev!r}")
    return {"id": request_id, "ev": ev, **fields}


def text(data: bytes) -> str:
    """Program output as protocol text: invalid UTF-8 becomes U+FFFD instead of breaking a message."""
    return data.decode("utf-8", errors="replace")


class LineReader:
    """Splits a byte stream into protocol lines; feed() whatever recv() returned, get complete lines back."""

    def __init__(self, max_line: int = 64 << 20) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    @property
    def empty(self) -> bool:
        """No part of a line is held back."""
        return not self._buffer

    def feed(self, chunk: bytes) -> list[bytes]:
        if not self._buffer and chunk.endswith(b"\n"):  # the usual case: whole lines, nothing held back
            lines = chunk[:-1].split(b"\n")
            return lines if b"" not in lines else [line for line in lines if line]
        self._buffer += chunk
        if b"\n" not in chunk:
            if len(self._buffer) > self._max_line:
                raise ProtocolError(f"line longer than {self._max_line} bytes")
            return []
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer = bytearray(rest)
        return [line for line in lines if line]


_DONE_QUIET = (
    b'{"id":%d,"ev":"done","value":null,"error":null,"exit_code":null,"truncated_bytes":0,'
    b'"worker_restarted":false,"worker_exit":null,"duration_s":%s}\n'
)


def encode_quiet_done(request_id: int, duration_s: float) -> bytes:
    """encode(event(request_id, "done", ...)) for the most common exec (no value, no error, nothing lost),
    byte for byte, without the JSON encoder: this is on the per-exec path of the guest agent."""
    return _DONE_QUIET % (request_id, repr(float(duration_s)).encode("ascii"))

"""Running the sandbox tools (appliance.client.tool_specs) for one conversation: the SDK's run_tool_call and
`appliance mcp` both call ToolSession.call, so a tool behaves the same whichever way a model reaches it.

A session has a default sandbox (given, or created on first use) and reaches any other sandbox of its key by id.
It remembers which sandboxes it created (the default and fork copies): close() deletes those, except frozen ones
(freeze is how a sandbox outlives its session), and only detaches from the rest.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .commands import CommandResult
from .errors import ApplianceError
from .sandbox import Execution, Sandbox
from .tool_specs import BY_NAME, ToolCallError, validate_arguments

MAX_RESULT_CHARS = 20_000


@dataclass
class ToolResult:
    text: str
    sandbox_id: str | None = None


class ToolSession:
    """`new_sandbox` makes the default sandbox on first use; `connect` reaches another one by id (both default to
    the SDK's environment: APPLIANCE_URL, APPLIANCE_API_KEY). Thread-safe: calls may come from several threads."""

    def __init__(self, sandbox: Sandbox | None = None, *, new_sandbox: Callable[[], Sandbox] | None = None,
                 connect: Callable[[str], Sandbox] | None = None, max_chars: int = MAX_RESULT_CHARS) -> None:
        self._default = sandbox
        self._new_sandbox = new_sandbox or Sandbox
        self._connect = connect or (lambda sandbox_id: Sandbox.connect(sandbox_id))
        self._handles: dict[str, Sandbox] = {sandbox.id: sandbox} if sandbox is not None else {}
        self._created: set[str] = set()
        self._lock = threading.Lock()
        self.max_chars = max_chars

    def call(self, name: str, arguments: dict[str, Any], timeout: float | None = None) -> ToolResult:
        """Run one tool call. Raises ToolCallError for a call that cannot run (its message is for the model) and
        ApplianceError for what the API answered (its .code and .message)."""
        tool = BY_NAME.get(name)
        if tool is None:
            raise ToolCallError(f"unknown tool {name!r}; the tools are {', '.join(BY_NAME)}")
        args = validate_arguments(tool, arguments)
        if args.get("timeout_s") is None and timeout is not None:
            args["timeout_s"] = timeout
        sandbox, note = self._sandbox(args["sandbox_id"])
        try:
            text = getattr(self, f"_{name}")(sandbox, args)
        except ApplianceError as exc:
            if exc.code in ("not_found", "sandbox_lost") and self._gone(sandbox):
                self._forget(sandbox.id)  # the next call without an id starts afresh instead of failing again
            raise
        return ToolResult(f"{note}{text}", sandbox.id)

    # ---- the tools ----------------------------------------------------------------------------------------------

    def _run_python(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        return format_execution(sandbox.run_code(args["code"], timeout=args["timeout_s"]), self.max_chars)

    def _run_command(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        return format_command(sandbox.commands.run(args["command"], timeout=args["timeout_s"]), self.max_chars)

    def _write_file(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        if args["encoding"] == "base64":
            try:
                data = base64.b64decode(args["content"], validate=True)
            except ValueError:
                raise ToolCallError("write_file: 'content' is not valid base64") from None
        else:
            data = args["content"].encode()
        written = sandbox.files.write(args["path"], data)
        return f"wrote {written.get('size', len(data))} bytes to {written.get('path', args['path'])}"

    def _read_file(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        limit: int = args["max_bytes"]
        data, cut = bytearray(), False
        chunks = sandbox.files.read_stream(args["path"])
        try:
            for chunk in chunks:
                data += chunk
                if len(data) > limit:
                    del data[limit:]
                    cut = True
                    break
        finally:
            chunks.close()  # stops the download of a long file here
        note = f"\n[note] cut at {limit} bytes; ask for more with max_bytes" if cut else ""
        if args["encoding"] == "base64":
            return base64.b64encode(bytes(data)).decode() + note
        try:
            text = bytes(data).decode()
        except UnicodeDecodeError as exc:
            if not cut or exc.start < len(data) - 3:  # not just a character split by the cut
                raise ToolCallError(f"read_file: {args['path']} is not UTF-8 text (byte {exc.start}); read it "
                                    "with encoding 'base64'") from None
            text = bytes(data[:exc.start]).decode()
        return (text if text else "[empty file]") + note

    def _list_files(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        page = sandbox.files.list_page(args["path"], args["cursor"], args["limit"])
        lines = [f"{e.get('type', '?'):<4} {e.get('size', 0):>12} {e.get('name', '')}" for e in page["entries"]]
        if not lines:
            lines.append("[empty directory]")
        if page.get("more") and page.get("cursor"):
            lines.append(f"[more] pass cursor={page['cursor']} for the next entries")
        return _cut("\n".join(lines), self.max_chars)

    def _fork(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        copies = sandbox.fork(args["n"])
        with self._lock:
            for copy in copies:
                self._handles[copy.id] = copy
                self._created.add(copy.id)
        return f"{len(copies)} new sandbox{'es' if len(copies) != 1 else ''} with {sandbox.id}'s state: " + \
            ", ".join(copy.id for copy in copies)

    def _freeze(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        sandbox.freeze()
        return f"{sandbox.id} is frozen; it outlives this session: name it as sandbox_id (or resume it) to go on"

    def _resume(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        return f"{sandbox.id} is {sandbox.resume()['state']}"

    def _close(self, sandbox: Sandbox, args: dict[str, Any]) -> str:
        self._forget(sandbox.id)
        sandbox.close()
        return f"{sandbox.id} is closed"

    # ---- sandboxes ----------------------------------------------------------------------------------------------

    def _sandbox(self, sandbox_id: str | None) -> tuple[Sandbox, str]:
        """The sandbox a call names (or the default), and a note for the model if this call created it."""
        with self._lock:  # one default even when two first calls race
            if sandbox_id is None:
                if self._default is not None:
                    return self._default, ""
                sandbox = self._new_sandbox()
                self._default = sandbox
                self._handles[sandbox.id] = sandbox
                self._created.add(sandbox.id)
                return sandbox, f"[sandbox] started {sandbox.id} for this session\n"
            if sandbox_id in self._handles:
                return self._handles[sandbox_id], ""
        sandbox = self._connect(sandbox_id)  # outside the lock: a GET that may resume a frozen sandbox
        with self._lock:
            return self._handles.setdefault(sandbox_id, sandbox), ""

    @staticmethod
    def _gone(sandbox: Sandbox) -> bool:
        """Whether the sandbox itself is gone (closed, idled out, lost), not just a file in it."""
        try:
            return sandbox.refresh().get("state") == "lost"
        except ApplianceError as exc:
            return exc.code in ("not_found", "sandbox_lost")

    def _forget(self, sandbox_id: str) -> None:
        with self._lock:
            handle = self._handles.pop(sandbox_id, None)
            self._created.discard(sandbox_id)
            if self._default is not None and self._default.id == sandbox_id:
                self._default = None
        if handle is not None:
            handle.detach()

    @property
    def default_sandbox_id(self) -> str | None:
        return self._default.id if self._default is not None else None

    def detach(self, keep: Sandbox | None = None) -> None:
        """Let go of every sandbox but `keep` without deleting any (they stay on the service)."""
        with self._lock:
            handles = [h for h in self._handles.values() if h is not keep]
            self._handles = {h.id: h for h in self._handles.values() if h is keep}
            self._created.clear()
            self._default = keep if self._default is keep else None
        for handle in handles:
            handle.detach()

    def close(self) -> None:
        """Delete the sandboxes this session created, except frozen ones; detach from every other. API errors
        are not raised: the sandboxes idle out on the service anyway."""
        with self._lock:
            handles, created = dict(self._handles), set(self._created)
            self._handles.clear()
            self._created.clear()
            self._default = None
        def let_go(sandbox_id: str, handle: Sandbox) -> None:
            try:
                if sandbox_id in created and handle.refresh().get("state") != "frozen":
                    handle.close()
                    return
            except ApplianceError:
                pass
            handle.detach()

        with ThreadPoolExecutor(max_workers=8) as pool:  # a client stopping its server waits only seconds
            list(pool.map(let_go, handles.keys(), handles.values()))


def format_execution(execution: Execution, max_chars: int = MAX_RESULT_CHARS) -> str:
    """An execution as plain text for a model: stdout, stderr, outputs, error; long output cut in the middle."""
    parts: list[str] = []
    if execution.stdout:
        parts.append(f"[stdout]\n{execution.stdout.rstrip()}")
    if execution.stderr:
        parts.append(f"[stderr]\n{execution.stderr.rstrip()}")
    has_value = execution.text is not None and bool(execution.results)
    displays = execution.results[:-1] if has_value else execution.results
    for bundle in displays:
        kinds = [kind for kind in bundle if kind != "text/plain"]
        if kinds:
            parts.append(f"[display: {', '.join(kinds)}] {bundle.get('text/plain', '')}".rstrip())
        elif "text/plain" in bundle:
            parts.append(f"[display]\n{bundle['text/plain']}")
    if execution.text is not None:
        kinds = [kind for kind in (execution.results[-1] if has_value else {}) if kind != "text/plain"]
        also = f" (also as {', '.join(kinds)})" if kinds else ""
        parts.append(f"[result{also}]\n{execution.text}")
    if execution.truncated_bytes:
        parts.append(f"[note] {execution.truncated_bytes} bytes of output were dropped")
    if execution.worker_restarted:
        parts.append("[note] the code did not stop when interrupted; the Python session was restarted and "
                     "earlier variables are gone")
    if execution.error is not None:
        parts.append(f"[error]\n{execution.error}")
    if execution.exit_code not in (None, 0):
        parts.append(f"[exit code] {execution.exit_code}")
    return _cut("\n".join(parts) if parts else "[no output]", max_chars)


def format_command(result: CommandResult, max_chars: int = MAX_RESULT_CHARS) -> str:
    parts = []
    if result.stdout:
        parts.append(f"[stdout]\n{result.stdout.rstrip()}")
    if result.stderr:
        parts.append(f"[stderr]\n{result.stderr.rstrip()}")
    if result.error is not None and result.exit_code is None:  # else the error only restates the exit code
        parts.append(f"[error]\n{result.error}")
    parts.append(f"[exit code] {result.exit_code if result.exit_code is not None else 'none (it did not finish)'}")
    return _cut("\n".join(parts), max_chars)


def _cut(text: str, max_chars: int) -> str:
    if len(text) > max_chars:
        half = max_chars // 2
        text = f"{text[:half]}\n[... {len(text) - max_chars} characters cut ...]\n{text[-half:]}"
    return text

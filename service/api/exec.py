"""/v1/sandboxes/{id}/exec and /interrupt: run code in a sandbox's persistent interpreter.

One exec at a time per sandbox: a second one while the first runs is refused with 409 sandbox_busy (no queue:
a caller that wants to wait retries, one that wants the first to stop calls /interrupt).

The result is one JSON object; with `Accept: application/x-ndjson` the same arrives as a stream of JSON lines
while the code runs: stdout / stderr / result events, then exactly one final `done` event carrying the whole
result (so a client may ignore everything but the last line).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import falcon

from service.engine import ExecResult
from service.errors import SandboxLostError, TooLarge

from .metrics import Metrics
from .request_models import ExecRequest, parse, read_json

log = logging.getLogger("appliance.api")
NDJSON = "application/x-ndjson"


def result_json(result: ExecResult) -> dict[str, Any]:
    """Jupyter's shape: display data in order, then the trailing expression's value; text is the value's text."""
    results = list(result.displays)
    if result.value is not None:
        results.append(result.value)
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "results": results,
        "text": result.text,
        "error": result.error,
        "exit_code": result.exit_code,
        "truncated_bytes": result.truncated_bytes,
        "worker_restarted": result.worker_restarted,
        "worker_exit": result.worker_exit,
        "duration_s": result.duration_s,
    }


def stream_events(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The API events for one agent event (the final one is added by the caller, with the folded result)."""
    kind = event.get("ev")
    if kind in ("stdout", "stderr"):
        return [{"type": kind, "data": event["data"]}]
    if kind == "display":
        return [{"type": "result", "data": event["data"], "is_main_result": False}]
    if kind == "done" and event.get("value") is not None:
        return [{"type": "result", "data": event["value"], "is_main_result": True}]
    return []


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


class Exec:
    def __init__(self, manager, max_body_bytes: int, max_code_bytes: int, metrics: Metrics) -> None:
        self._manager = manager
        self._max_body = max_body_bytes
        self._max_code = max_code_bytes
        self._metrics = metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        body = parse(ExecRequest, read_json(req, self._max_body))
        if len(body.code.encode()) > self._max_code:
            raise TooLarge(f"code is longer than the {self._max_code}-byte limit (service.max_code_bytes)")
        started = time.perf_counter()
        events = self._manager.exec_events(req.context.owner, sandbox_id, body.code, body.language, body.timeout_s,
                                           **({"envs": body.envs} if body.envs else {}))
        streaming = req.client_prefers(["application/json", NDJSON]) == NDJSON
        if streaming:
            resp.content_type = NDJSON
            resp.stream = self._stream(req.context.owner, sandbox_id, body.language, events, started)
            return
        result, lost = ExecResult(), False
        for event in events:
            result.add(event)
            lost = lost or bool(event.get("lost"))
        self._metrics.exec_seconds.labels(body.language, "json").observe(time.perf_counter() - started)
        if lost:
            message = (result.error or {}).get("value") or "the sandbox's VM stopped"
            raise SandboxLostError(f"{message}; delete the sandbox and create a new one")
        resp.media = result_json(result)

    def _stream(
        self, owner: str, sandbox_id: str, language: str, events: Iterator[dict[str, Any]], started: float
    ) -> Iterator[bytes]:
        result, finished, lost = ExecResult(), False, False
        try:
            for event in events:
                result.add(event)
                lost = lost or bool(event.get("lost"))
                for out in stream_events(event):
                    yield _line(out)
            finished = True
        except Exception as exc:  # the status line is gone: report the failure in the final event instead
            log.exception("exec stream of %s failed", sandbox_id)
            result.error = {"name": "InternalError", "value": f"the service failed during the exec: {exc}",
                            "traceback": ""}
            finished = True
        finally:
            if not finished:
                # The client went away mid-exec: stop the code rather than let it run for nobody.
                with contextlib.suppress(Exception):
                    self._manager.interrupt(owner, sandbox_id)
            with contextlib.suppress(Exception):
                events.close()  # type: ignore[attr-defined]
            self._metrics.exec_seconds.labels(language, "stream").observe(time.perf_counter() - started)
        yield _line({"type": "done", **result_json(result), "sandbox_lost": lost})


class Interrupt:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        self._manager.interrupt(req.context.owner, sandbox_id)
        resp.status = falcon.HTTP_202
        resp.media = {"id": sandbox_id, "interrupted": True}

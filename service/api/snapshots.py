"""Named snapshots: POST /v1/sandboxes/{id}/snapshots saves a sandbox's live state under a name of the caller's;
GET /v1/snapshots lists them; GET and DELETE /v1/snapshots/{name}. POST /v1/sandboxes {"snapshot": name} starts
sandboxes from one (sandboxes.py). A snapshot of another key is reported exactly like one that never existed."""

from __future__ import annotations

import time
from typing import Any

import falcon

from service.registry import READY, SnapshotRecord
from service.snapshot_names import name_problem

from .error_responses import InvalidField
from .metrics import Metrics
from .request_models import SnapshotRequest, parse, read_json
from .sandboxes import _iso


def snapshot_json(record: SnapshotRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "state": "ready" if record.state == READY else "saving",
        "source_sandbox_id": record.source,
        "vcpus": record.machine.get("vcpus"),
        "memory_mib": record.machine.get("memory_mib"),
        "size_bytes": record.size_bytes,
        "created_at": _iso(record.created_at),
    }


def _checked(name: str) -> str:
    problem = name_problem(name)
    if problem is not None:
        raise InvalidField("name", problem)
    return name


class SandboxSnapshots:
    """POST /v1/sandboxes/{sandbox_id}/snapshots {name}: 201 with the snapshot; the sandbox keeps running."""

    def __init__(self, manager, max_body_bytes: int, metrics: Metrics) -> None:
        self._manager = manager
        self._max_body = max_body_bytes
        self._metrics = metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        body = parse(SnapshotRequest, read_json(req, self._max_body))
        started = time.perf_counter()
        record = self._manager.snapshot(req.context.owner, sandbox_id, body.name)
        self._metrics.lifecycle_seconds.labels("snapshot").observe(time.perf_counter() - started)
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/snapshots/{record.name}"
        resp.media = snapshot_json(record)


class SnapshotCollection:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"snapshots": [snapshot_json(record) for record in self._manager.snapshots(req.context.owner)]}


class SnapshotItem:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        resp.media = snapshot_json(self._manager.get_snapshot(req.context.owner, _checked(name)))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        self._manager.delete_snapshot(req.context.owner, _checked(name))
        resp.status = falcon.HTTP_204

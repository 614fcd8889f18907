"""/v1/sandboxes: create, list (optionally by state), show and delete the caller's sandboxes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import falcon

from service.engine import netpolicy
from service.registry import RUNNING, SandboxRecord
from service.snapshot_names import DEFAULT_TEMPLATE

from .error_responses import InvalidField
from .metrics import Metrics
from .request_models import VISIBLE_STATES, CreateSandbox, parse, read_json


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_json(record: SandboxRecord) -> dict[str, Any]:
    machine = record.machine or {}
    # Only a running sandbox has an idle deadline; a frozen or lost one is kept until it is deleted.
    expires = _iso(record.last_active_at + record.timeout_s) if record.state == RUNNING else None
    return {
        "id": record.id,
        "state": record.state,
        "template_id": record.template_id,
        "vcpus": machine.get("vcpus"),
        "memory_mib": machine.get("memory_mib"),
        "timeout_s": record.timeout_s,
        "persistent": record.persistent,
        "network": record.network,
        "metadata": record.metadata,
        "created_at": _iso(record.created_at),
        "last_active_at": _iso(record.last_active_at),
        "expires_at": expires,
    }


class SandboxCollection:
    def __init__(self, manager, max_body_bytes: int, metrics: Metrics) -> None:
        self._manager = manager
        self._max_body = max_body_bytes
        self._metrics = metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse(CreateSandbox, read_json(req, self._max_body))
        if body.snapshot is not None:  # a snapshot brings its own size and state
            for name in ("template", "vcpus", "memory_mib"):
                if getattr(body, name) is not None:
                    raise InvalidField(name, "cannot be given with snapshot: a snapshot's sandboxes have its size")
        if body.template not in (None, DEFAULT_TEMPLATE):
            for name in ("vcpus", "memory_mib"):
                if getattr(body, name) is not None:
                    raise InvalidField(name, "cannot be given with a published template: its sandboxes have its size")
        try:
            netpolicy.parse_policy(body.network)
        except netpolicy.PolicyError as exc:
            raise InvalidField("network", str(exc)) from None
        started = time.perf_counter()
        record = self._manager.create(
            req.context.owner, vcpus=body.vcpus, memory_mib=body.memory_mib, timeout_s=body.timeout_s,
            metadata=body.metadata, persistent=body.persistent, network_policy=body.network,
            snapshot=body.snapshot, template=body.template,
            **({"envs": body.envs} if body.envs else {}),
        )
        self._metrics.create_seconds.observe(time.perf_counter() - started)
        self._metrics.creates.inc()
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/sandboxes/{record.id}"
        resp.media = sandbox_json(record)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        state = req.get_param("state")
        if state is not None and state not in VISIBLE_STATES:
            raise InvalidField("state", f"must be one of {', '.join(VISIBLE_STATES)} (got {state!r})")
        records = self._manager.list(req.context.owner, state=state)
        resp.media = {"sandboxes": [sandbox_json(record) for record in records]}


class SandboxItem:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        resp.media = sandbox_json(self._manager.get(req.context.owner, sandbox_id))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        self._manager.delete(req.context.owner, sandbox_id)
        resp.status = falcon.HTTP_204

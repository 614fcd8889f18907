"""/v1/sandboxes/{id}/fork, /freeze and /resume: branch a live sandbox, put it to sleep on disk, wake it.

The manager does the work and raises the service's errors (429 too many sandboxes, 507 no memory or no frozen
quota left, 409 running code, 422 a snapshot this host cannot restore); these resources validate, time and render.
"""

from __future__ import annotations

import time

import falcon

from .error_responses import InvalidField
from .metrics import Metrics
from .request_models import ForkRequest, parse, read_json
from .sandboxes import sandbox_json


class Fork:
    def __init__(self, manager, max_body_bytes: int, max_fork: int, metrics: Metrics) -> None:
        self._manager = manager
        self._max_body = max_body_bytes
        self._max_fork = max_fork
        self._metrics = metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        body = parse(ForkRequest, read_json(req, self._max_body))
        if body.n > self._max_fork:
            raise InvalidField("n", f"must be at most {self._max_fork} (service.max_fork); got {body.n}")
        started = time.perf_counter()
        records = self._manager.fork(req.context.owner, sandbox_id, body.n)
        self._metrics.lifecycle_seconds.labels("fork").observe(time.perf_counter() - started)
        resp.status = falcon.HTTP_201
        resp.media = {"sandboxes": [sandbox_json(record) for record in records]}


class StateChange:
    """POST /freeze or /resume: the manager's method of that name, timed; answers the sandbox as it now is."""

    def __init__(self, manager, metrics: Metrics, action: str) -> None:
        self._change = getattr(manager, action)
        self._action = action
        self._metrics = metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response, sandbox_id: str) -> None:
        started = time.perf_counter()
        record = self._change(req.context.owner, sandbox_id)
        self._metrics.lifecycle_seconds.labels(self._action).observe(time.perf_counter() - started)
        resp.media = sandbox_json(record)

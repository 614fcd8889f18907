"""Probes: liveness (the process answers) and readiness (creates can be served from a warm template)."""

from __future__ import annotations

import falcon

from service.errors import NotReady

READY_RETRY_AFTER_S = 2


class Healthz:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readyz:
    def __init__(self, manager) -> None:
        self._manager = manager

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        reason = self._manager.readiness()
        if reason is not None:
            raise NotReady(reason, retry_after=READY_RETRY_AFTER_S)
        resp.media = {"status": "ready"}

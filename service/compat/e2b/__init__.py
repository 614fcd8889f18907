"""An E2B-compatible surface, so an application written for E2B's SDKs runs here with only its environment changed:

    E2B_API_URL=http://NODE:8080/e2b  E2B_SANDBOX_URL=http://NODE:8080/e2b  E2B_API_KEY=<an appliance key>

Built from E2B's public API description; E2B's SDKs are used as clients only (tests/integration/test_e2b.py).

Control plane (key in X-API-Key):
    POST   /e2b/sandboxes | /e2b/v2/sandboxes                 create (templateID, timeout, metadata, envVars)
    GET    /e2b/sandboxes | /e2b/v2/sandboxes                 list the key's sandboxes
    GET    /e2b/sandboxes/{id}                                 info
    DELETE /e2b/sandboxes/{id}                                 kill
    POST   /e2b/sandboxes/{id}/timeout                         set the timeout
    POST   /e2b/sandboxes/{id}/pause                           pause (our freeze: the live process is kept)
    POST   /e2b/sandboxes/{id}/connect | /e2b/v2/.../connect  connect (resumes a paused one), /resume likewise
In-sandbox (headers E2b-Sandbox-Id, E2b-Sandbox-Port; X-Access-Token from the create reply):
    POST   /e2b/execute                                        port 49999: run code, one JSON object a line
Everything else under /e2b answers an error naming the E2B feature as not supported (docs/e2b.md), never a hang.
"""

from __future__ import annotations

import falcon

from service.keys import KeyRing

from .resources import install_routes

__all__ = ["PREFIX", "install"]

PREFIX = "/e2b"


def install(app: falcon.App, manager, keys: KeyRing, secret: bytes, max_body_bytes: int, max_code_bytes: int) -> None:
    install_routes(app, PREFIX, manager, keys, secret, max_body_bytes, max_code_bytes)

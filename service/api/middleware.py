"""Cross-cutting request handling: request ids and the worker header, API-key auth, body size limits."""

from __future__ import annotations

import os
import secrets
import time

import falcon

from service.errors import Forbidden, TooLarge, Unauthorized
from service.keys import METRICS, TENANT, KeyRing

# Routes anyone may call: probes and the API's own description.
PUBLIC_PATHS = frozenset({"/v1/healthz", "/v1/readyz", "/v1/openapi.json", "/v1/docs"})
# Routes for a metrics key (and only for one): Prometheus sees every tenant's activity, a tenant must not.
METRICS_PATHS = frozenset({"/metrics"})
WORKER_HEADER = "X-Appliance-Worker"
REQUEST_ID_HEADER = "X-Request-Id"


class RequestContext:
    """A request id for logs and error messages, and which worker process served the request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = secrets.token_hex(6)
        req.context.started = time.perf_counter()
        req.context.error_code = None

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        resp.set_header(WORKER_HEADER, str(os.getpid()))
        resp.set_header(REQUEST_ID_HEADER, getattr(req.context, "request_id", "-"))
        started = getattr(req.context, "started", None)
        if started is not None:  # time in the app until the response headers (a streamed body comes after)
            resp.set_header("Server-Timing", f"app;dur={(time.perf_counter() - started) * 1000:.3f}")


class Auth:
    """`Authorization: Bearer <key>`, looked up in the key ring (keys are compared only as keyed hashes). The key's
    id becomes req.context.owner (and key_id, for logs: the key itself is never logged). A key of the wrong kind
    for the route is 403."""

    def __init__(self, keys: KeyRing, own_auth_prefixes: tuple[str, ...] = ()) -> None:
        self._keys = keys
        # front doors of service/compat: they authenticate by their own protocol's headers (E2B's X-API-Key)
        self._own_auth = own_auth_prefixes

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.owner = req.context.key_id = None
        if req.path in PUBLIC_PATHS or (self._own_auth and req.path.startswith(self._own_auth)):
            return
        header = req.get_header("Authorization") or ""
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            resp.set_header("WWW-Authenticate", 'Bearer realm="appliance"')
            raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
        credential = self._keys.lookup(key.strip())
        if credential is None:
            resp.set_header("WWW-Authenticate", 'Bearer realm="appliance", error="invalid_token"')
            raise Unauthorized("the API key is not valid for this service (unknown, revoked or expired)")
        req.context.key_id = credential.key_id
        wanted = METRICS if req.path in METRICS_PATHS else TENANT
        if credential.kind != wanted:
            raise Forbidden(f"key {credential.key_id} is a {credential.kind} key; this route needs a {wanted} key"
                            + (" (`appliance keys add NAME --metrics`)" if wanted == METRICS else ""))
        req.context.owner = credential.key_id


class BodyLimit:
    """Refuse a declared body past the limit before reading it (readers enforce it again for chunked bodies).
    A resource with its own limit (file uploads) says so in its `max_body_bytes` attribute."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body = max_body_bytes

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        limit = getattr(resource, "max_body_bytes", None) or self._max_body
        if req.content_length is not None and req.content_length > limit:
            raise TooLarge(f"request body of {req.content_length} bytes exceeds the {limit}-byte limit")

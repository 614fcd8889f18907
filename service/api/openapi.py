"""The OpenAPI 3.1 description of the API, kept next to the resources it describes.

Request schemas come from the pydantic models that validate the bodies, so the two cannot disagree; a unit test
walks the app's router and checks that every route and method is described here (and nothing else is).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import falcon

from ..routing import SANDBOX_ID_PATTERN
from . import openapi_commands
from .file_ops import MakeDirRequest, RenameRequest
from .request_models import VISIBLE_STATES, CreateSandbox, ExecRequest, ForkRequest, SnapshotRequest

API_VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    if 401 in statuses:  # every route that takes a key also refuses a key of the wrong kind, and reads the registry
        statuses = tuple(sorted({*statuses, 403, 503}))
    return {str(status): {"$ref": f"#/components/responses/E{status}"} for status in statuses}


_ERROR_TEXT = {
    400: "Malformed request: the body is not JSON, or not a JSON object (code bad_request).",
    401: "No API key, or not a valid one: unknown, revoked, expired, or a rotated-away secret past its overlap "
    "(code unauthorized).",
    403: "A valid key of the wrong kind (code forbidden): a metrics key on a sandbox route, or a tenant key on "
    "/metrics.",
    404: "No such sandbox (or snapshot, or template) for this key: it never existed, was closed or deleted, or "
    "belongs to another key (code not_found).",
    409: "The sandbox is already running code: one exec at a time per sandbox, no queue, and no fork, freeze or "
    "snapshot while code runs (code sandbox_busy). Retry when it finishes, or POST .../interrupt. Also: this key "
    "has a snapshot of that name already (code snapshot_exists). On the file routes also: the target exists (code "
    "already_exists) or a directory to remove is not empty (code not_empty); the message names the path.",
    410: "The sandbox's VM stopped (code sandbox_lost): delete it and create a new one.",
    413: "The body (or the code, or the upload) is larger than the service's limit (code too_large).",
    422: "A field is invalid (code invalid); error.field names it. Also: a frozen sandbox this host cannot "
    "restore (code snapshot_incompatible: made by another QEMU release, machine type or guest image) or whose "
    "metadata fails authentication (code snapshot_invalid); it stays frozen.",
    429: "A limit on sandboxes per key or per host is reached (code limit_reached); see Retry-After. A fork "
    "counts each copy; frozen sandboxes do not count. Also a freeze or named snapshot past the key's "
    "service.max_frozen_per_key (frozen sandboxes and named snapshots together).",
    500: "The service failed (code internal). A failed fork, freeze or resume leaves the sandbox as it was "
    "(running, or frozen); the message says what failed or quotes a request id the service log explains.",
    503: "Not ready: no warm template yet (code not_ready), or the node's registry is locked by another process "
    "(code node_unavailable); see Retry-After.",
    507: "Not enough room: host memory or vCPUs for the sandboxes asked for (code insufficient_capacity: committed "
    "guest memory past service.memory_overcommit, or the host's reserve; vCPUs past service.vcpu_overcommit), free "
    "disk for a freeze or free memory filesystem for a snapshot (code insufficient_capacity), or the quota for "
    "frozen sandboxes and snapshots (code insufficient_storage); the message says what is short and by how much.",
}
_WITH_RETRY_AFTER = {429, 503}
DEFAULT_MAX_FORK = 64  # the spec's default for service.max_fork; a running service states its own

_SANDBOX_ID = {
    "name": "sandbox_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": SANDBOX_ID_PATTERN},
    "description": "The sandbox's id, as returned by POST /v1/sandboxes.",
}


def _file_path(required: bool, description: str) -> dict[str, Any]:
    # No path may hold a NUL byte; an empty one is "not given" (a file: 422; the listing: "/").
    schema = {"type": "string", "pattern": "^[^\\x00]+$" if required else "^[^\\x00]*$"}
    if required:
        schema["minLength"] = 1
    return {"name": "path", "in": "query", "required": required, "schema": schema, "description": description}


def _link(operation_id: str, id_expression: str, description: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": {"sandbox_id": id_expression}, "description": description}


# What a client can do next with the sandbox an answer names (OpenAPI links: clients and fuzzers follow them).
_NEXT_OPERATIONS = ("getSandbox", "exec", "interrupt", "forkSandbox", "freezeSandbox", "resumeSandbox",
                    "writeFile", "readFile", "listDir", "deleteSandbox")


def _links(id_expression: str, operations: tuple[str, ...] = _NEXT_OPERATIONS) -> dict[str, Any]:
    return {f"{operation[0].upper()}{operation[1:]}": _link(operation, id_expression, "the same sandbox")
            for operation in operations}


_STREAM_EVENT = {
    "description": "One line of an exec stream (application/x-ndjson). The last line is always type done.",
    "oneOf": [
        {"type": "object", "required": ["type", "data"], "properties": {
            "type": {"enum": ["stdout", "stderr"]}, "data": {"type": "string"}}},
        {"type": "object", "required": ["type", "data", "is_main_result"], "properties": {
            "type": {"const": "result"}, "data": _ref("MimeBundle"),
            "is_main_result": {"type": "boolean", "description": "true for the trailing expression's value"}}},
        {"allOf": [_ref("ExecResult"), {"type": "object", "required": ["type", "sandbox_lost"], "properties": {
            "type": {"const": "done"},
            "sandbox_lost": {"type": "boolean", "description": "the VM stopped during the exec"}}}]},
    ],
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "description": "stable machine-readable code, e.g. sandbox_busy"},
            "message": {"type": "string", "description": "what happened and what to do"},
            "field": {"type": "string", "description": "for code invalid: the request field at fault"},
        }}},
    },
    "Sandbox": {
        "type": "object",
        "required": ["id", "state", "timeout_s", "persistent", "metadata", "created_at", "last_active_at",
                     "expires_at"],
        "properties": {
            "id": {"type": "string", "examples": ["sb-3f9c0a1b2c3d4e5f"]},
            "state": {"enum": list(VISIBLE_STATES),
                      "description": "running; frozen (on disk, no VM: the next exec resumes it); lost (its VM "
                                     "stopped unexpectedly)"},
            "template_id": {"type": ["string", "null"]},
            "vcpus": {"type": ["integer", "null"]},
            "memory_mib": {"type": ["integer", "null"]},
            "timeout_s": {"type": "number",
                          "description": "idle period: closed (or frozen, if persistent) this long after its last "
                                         "use"},
            "persistent": {"type": "boolean", "description": "frozen instead of closed when idle"},
            "network": {
                "type": ["object", "null"],
                "description": "null: no network interface. Else the policy as given (egress) and the network "
                               "identity of the VM now running: mac, address (the guest's), host_address (its "
                               "namespace's end of the host link). A fork's copies and a resumed sandbox keep the "
                               "policy and get a new identity.",
                "properties": {"egress": {}, "mac": {"type": "string"}, "address": {"type": "string"},
                               "host_address": {"type": "string"}},
            },
            "metadata": {"type": "object",
                         "description": "as given at create; a fork's copies add forked_from (the source's id)"},
            "created_at": {"type": "string", "format": "date-time"},
            "last_active_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time",
                           "description": "when an idle running sandbox is closed or frozen; null unless running"},
        },
    },
    "SandboxList": {"type": "object", "required": ["sandboxes"],
                    "properties": {"sandboxes": {"type": "array", "items": _ref("Sandbox")}}},
    "CreateSandbox": CreateSandbox.model_json_schema(),
    "ExecRequest": ExecRequest.model_json_schema(),
    "ForkRequest": ForkRequest.model_json_schema(),
    "MimeBundle": {
        "type": "object", "additionalProperties": {},
        "description": "Jupyter display data: text/plain always; text/html (DataFrames), image/png (base64), ...",
        "examples": [{"text/plain": "6"}],
    },
    "ExecError": {"type": "object", "required": ["name", "value", "traceback"], "properties": {
        "name": {"type": "string", "examples": ["ZeroDivisionError"]},
        "value": {"type": "string"}, "traceback": {"type": "string"}}},
    "ExecResult": {
        "type": "object",
        "required": ["stdout", "stderr", "results", "text", "error", "exit_code", "truncated_bytes",
                     "worker_restarted", "duration_s"],
        "properties": {
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "results": {"type": "array", "items": _ref("MimeBundle"),
                        "description": "display data in order, then the trailing expression's value (as Jupyter)"},
            "text": {"type": ["string", "null"], "description": "text/plain of the trailing expression's value"},
            "error": {"oneOf": [_ref("ExecError"), {"type": "null"}]},
            "exit_code": {"type": ["integer", "null"], "description": "bash only"},
            "truncated_bytes": {"type": "integer", "description": "output dropped past the output cap"},
            "worker_restarted": {"type": "boolean",
                                 "description": "the code ignored the interrupt and its interpreter was replaced "
                                                "(the namespace is gone)"},
            "worker_exit": {"type": ["string", "null"]},
            "duration_s": {"type": "number"},
        },
    },
    "StreamEvent": _STREAM_EVENT,
    "FileInfo": {"type": "object", "required": ["path", "size", "sha256"], "properties": {
        "path": {"type": "string"}, "size": {"type": "integer"}, "sha256": {"type": "string"}}},
    "DirListing": {"type": "object", "required": ["path", "entries", "more", "cursor"], "properties": {
        "path": {"type": "string"},
        "entries": {"type": "array", "maxItems": 10000, "description": "at most `limit` entries, in name order",
                    "items": {"type": "object", "required": ["name", "type"], "properties": {
                        "name": {"type": "string"}, "type": {"type": "string", "examples": ["file", "dir", "link"]},
                        "size": {"type": "integer"}, "mtime": {"type": "number"}}}},
        "more": {"type": "boolean", "description": "entries remain after this page"},
        "cursor": {"type": ["string", "null"], "description": "pass as ?cursor= for the next page (null: none)"}}},
    "FileStat": {"type": "object", "required": ["name", "path", "type", "size", "mtime", "mode"], "properties": {
        "name": {"type": "string"}, "path": {"type": "string"}, "type": {"enum": ["file", "dir", "link", "other"]},
        "size": {"type": "integer"}, "mtime": {"type": "number"}, "mode": {"type": "integer",
                                                                          "description": "permission bits"},
        "target": {"type": "string", "description": "for a link: what it points to (not followed)"}}},
    "MakeDirRequest": MakeDirRequest.model_json_schema(),
    "RenameRequest": RenameRequest.model_json_schema(),
    "WatchEvent": {
        "description": "One line of a watch stream (application/x-ndjson). The last line is always type end.",
        "oneOf": [
            {"type": "object", "required": ["type", "path", "is_dir"], "properties": {
                "type": {"enum": ["create", "modify", "delete"]}, "path": {"type": "string"},
                "is_dir": {"type": "boolean"}}},
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["overflow", "ping"]}},
             "description": "overflow: events were dropped (more than the guest keeps between polls); ping: "
                            "the stream is quiet but alive"},
            {"type": "object", "required": ["type", "reason"], "properties": {
                "type": {"const": "end"}, "reason": {"enum": ["timeout", "deleted", "sandbox_lost", "error"]}}},
        ],
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "SnapshotRequest": SnapshotRequest.model_json_schema(),
    "Snapshot": {
        "type": "object",
        "required": ["name", "state", "source_sandbox_id", "vcpus", "memory_mib", "size_bytes", "created_at"],
        "properties": {
            "name": {"type": "string", "examples": ["pandas-loaded"]},
            "state": {"enum": ["saving", "ready"], "description": "saving while its state is written; ready: "
                                                                  "POST /v1/sandboxes {\"snapshot\": name} uses it"},
            "source_sandbox_id": {"type": ["string", "null"]},
            "vcpus": {"type": ["integer", "null"]},
            "memory_mib": {"type": ["integer", "null"]},
            "size_bytes": {"type": "integer", "description": "memory it takes on the node (the source's RAM in use)"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "SnapshotList": {"type": "object", "required": ["snapshots"],
                     "properties": {"snapshots": {"type": "array", "items": _ref("Snapshot")}}},
    **openapi_commands.SCHEMAS,
}


def _paths() -> dict[str, Any]:
    sandbox = [_SANDBOX_ID]
    return {
        "/v1/sandboxes": {
            "post": {
                "operationId": "createSandbox", "tags": ["sandboxes"], "summary": "Create a sandbox",
                "description": "A clone of the warm template (handed out from the warm pool when one is ready), "
                "or a fresh boot when vcpus/memory_mib differ from the spec's. The body may be empty. A persistent "
                "sandbox is frozen to disk after timeout_s idle, instead of closed. With a network policy it gets "
                "a network interface whose traffic the host filters (422 network_unavailable where the service "
                "cannot: it needs root). With snapshot (one of this key's) or template (one an operator published) "
                "it starts from that saved live state instead, in its size (404 if there is none of that name).",
                "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("CreateSandbox")}}},
                "responses": {"201": {**_json(_ref("Sandbox"), "Created; Location names it."),
                                      "headers": {"Location": {"required": True, "schema": {"type": "string"},
                                                               "description": "/v1/sandboxes/{id}"}},
                                      "links": _links("$response.body#/id")},
                              **_errors(400, 401, 404, 413, 422, 429, 500, 503, 507)},
            },
            "get": {
                "operationId": "listSandboxes", "tags": ["sandboxes"], "summary": "List this key's sandboxes",
                "parameters": [{"name": "state", "in": "query", "required": False,
                                "schema": {"enum": list(VISIBLE_STATES)},
                                "description": "only sandboxes in this state, e.g. frozen"}],
                "responses": {"200": _json(_ref("SandboxList"), "The caller's own sandboxes, oldest first."),
                              **_errors(401, 422)},
            },
        },
        "/v1/sandboxes/{sandbox_id}": {
            "parameters": sandbox,
            "get": {"operationId": "getSandbox", "tags": ["sandboxes"], "summary": "Show a sandbox",
                    "responses": {"200": _json(_ref("Sandbox"), "The sandbox."), **_errors(401, 404)}},
            "delete": {"operationId": "deleteSandbox", "tags": ["sandboxes"], "summary": "Close a sandbox",
                       "description": "Stops its VM (or deletes its snapshot, if frozen) and forgets it.",
                       "responses": {"204": {"description": "Closed."}, **_errors(401, 404)}},
        },
        "/v1/sandboxes/{sandbox_id}/exec": {
            "parameters": sandbox,
            "post": {
                "operationId": "exec", "tags": ["code"], "summary": "Run code in the sandbox",
                "description": "Python runs in the sandbox's persistent interpreter (state is kept between calls); "
                "bash runs a script. One exec at a time per sandbox: a second one gets 409 sandbox_busy. On "
                "timeout the code gets KeyboardInterrupt (the namespace is kept); code that ignores it has its "
                "interpreter replaced (worker_restarted). Send `Accept: application/x-ndjson` to receive events "
                "as they happen, one JSON object per line, ending with a done event that carries the whole result. "
                "A frozen sandbox is resumed first.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ExecRequest")}}},
                "responses": {
                    "200": {"description": "The result (a code error is a result too: see error).", "content": {
                        "application/json": {"schema": _ref("ExecResult")},
                        "application/x-ndjson": {"schema": _ref("StreamEvent")}}},  # one StreamEvent a line
                    **_errors(400, 401, 404, 409, 410, 413, 422, 429, 507),
                },
            },
        },
        "/v1/sandboxes/{sandbox_id}/interrupt": {
            "parameters": sandbox,
            "post": {"operationId": "interrupt", "tags": ["code"], "summary": "Interrupt the running code",
                     "description": "KeyboardInterrupt in the running exec, if any; the namespace is kept.",
                     "responses": {"202": _json({"type": "object", "properties": {
                         "id": {"type": "string"}, "interrupted": {"type": "boolean"}}}, "Interrupt sent."),
                         **_errors(401, 404, 410)}},
        },
        **_lifecycle_paths(sandbox),
        "/v1/sandboxes/{sandbox_id}/files": {
            "parameters": sandbox,
            "put": {
                "operationId": "writeFile", "tags": ["files"], "summary": "Upload a file (streamed)",
                "description": "The body is the file's bytes (Content-Length or chunked); parent directories are "
                "created. Never buffered whole by the service.",
                "parameters": [_file_path(True, "absolute path in the sandbox, e.g. /data/in.csv")],
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}},
                "responses": {"200": _json(_ref("FileInfo"), "Written; sha256 of what arrived."),
                              **_errors(401, 404, 409, 410, 413, 422, 429, 507)},
            },
            "get": {
                "operationId": "readFile", "tags": ["files"], "summary": "Download a file (streamed)",
                "parameters": [_file_path(True, "absolute path in the sandbox")],
                "responses": {"200": {"description": "The file's bytes, with Content-Length.", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "contentMediaType": "application/octet-stream"}}}},
                              **_errors(401, 404, 409, 410, 422, 429, 507)},
            },
            "delete": {
                "operationId": "removeFile", "tags": ["files"], "summary": "Remove a file, link or directory",
                "description": "A link is removed, not what it points to. A directory must be empty unless "
                "recursive=true (else 409 not_empty).",
                "parameters": [_file_path(True, "path in the sandbox"),
                               {"name": "recursive", "in": "query", "required": False,
                                "schema": {"type": "boolean", "default": False}}],
                "responses": {"204": {"description": "Removed."}, **_errors(401, 404, 409, 410, 422, 429, 507)},
            },
        },
        "/v1/sandboxes/{sandbox_id}/files/list": {
            "parameters": sandbox,
            "get": {"operationId": "listDir", "tags": ["files"], "summary": "List a directory",
                    "description": "A page of at most `limit` entries in name order; `more` and `cursor` ask for "
                                   "the next one.",
                    "parameters": [_file_path(False, "directory in the sandbox (default /)"),
                                   {"name": "limit", "in": "query", "required": False,
                                    "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000},
                                    "description": "entries per page"},
                                   {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
                                    "description": "the previous page's cursor (omit for the first page)"},
                                   {"name": "depth", "in": "query", "required": False,
                                    "schema": {"type": "integer", "minimum": 1, "maximum": 32, "default": 1},
                                    "description": "1: the directory's entries; more: each subdirectory's entries "
                                                   "follow it, named by their path relative to `path`"}],
                    "responses": {"200": _json(_ref("DirListing"), "One page of the directory's entries."),
                                  **_errors(401, 404, 409, 410, 422, 429, 507)}},
        },
        **_file_op_paths(sandbox),
        **openapi_commands.paths(sandbox, _errors),
        "/v1/healthz": {"get": {"operationId": "healthz", "tags": ["service"], "security": [],
                                "summary": "Liveness: the process answers (no key needed)",
                                "responses": {"200": _json(_ref("Status"), "Alive.")}}},
        "/v1/readyz": {"get": {"operationId": "readyz", "tags": ["service"], "security": [],
                               "summary": "Readiness: creates can be served from a warm template (no key needed)",
                               "responses": {"200": _json(_ref("Status"), "Ready."), **_errors(503)}}},
        "/metrics": {"get": {"operationId": "metrics", "tags": ["service"],
                             "summary": "Prometheus metrics (sandboxes by state, exec latency, creates, errors); "
                                        "a metrics key only",
                             "responses": {"200": {"description": "Prometheus text exposition format.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **_errors(401)}}},
        "/v1/openapi.json": {"get": {"operationId": "openapi", "tags": ["service"], "security": [],
                                     "summary": "This document (no key needed)",
                                     "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document.")}}},
        "/v1/docs": {"get": {"operationId": "docs", "tags": ["service"], "security": [],
                             "summary": "This document as a readable page (no key needed, no external assets)",
                             "responses": {"200": {"description": "HTML.",
                                                   "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    }


def _file_op_paths(sandbox: list[dict[str, Any]]) -> dict[str, Any]:
    path = _file_path(True, "path in the sandbox (relative: under /data)")
    errors = _errors(401, 404, 409, 410, 422, 429, 507)
    return {
        "/v1/sandboxes/{sandbox_id}/files/stat": {
            "parameters": sandbox,
            "get": {"operationId": "statFile", "tags": ["files"], "summary": "Stat a file, directory or link",
                    "description": "404 if nothing is there (the SDK's exists()). A link is described, not followed.",
                    "parameters": [path], "responses": {"200": _json(_ref("FileStat"), "The entry."), **errors}},
        },
        "/v1/sandboxes/{sandbox_id}/files/mkdir": {
            "parameters": sandbox,
            "post": {"operationId": "makeDir", "tags": ["files"], "summary": "Make a directory (mkdir -p)",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref("MakeDirRequest")}}},
                     "responses": {"201": _json({"type": "object"}, "Made: {path, created: true}."),
                                   "200": _json({"type": "object"}, "There already (parents): {path, created: "
                                                                    "false}."),
                                   **_errors(400, 401, 404, 409, 410, 413, 422, 429, 507)}},
        },
        "/v1/sandboxes/{sandbox_id}/files/rename": {
            "parameters": sandbox,
            "post": {"operationId": "renameFile", "tags": ["files"], "summary": "Rename or move",
                     "description": "A file, link or directory, to another directory or filesystem too. An "
                                    "existing `to` is 409 already_exists unless overwrite.",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref("RenameRequest")}}},
                     "responses": {"200": _json({"type": "object"}, "Moved: {path: the new path}."),
                                   **_errors(400, 401, 404, 409, 410, 413, 422, 429, 507)}},
        },
        "/v1/sandboxes/{sandbox_id}/files/watch": {
            "parameters": sandbox,
            "get": {"operationId": "watchDir", "tags": ["files"], "summary": "Watch a directory (NDJSON stream)",
                    "description": "create/modify/delete events under the directory (its subdirectories too with "
                                   "recursive=true) until timeout_s passes, the directory goes or the client "
                                   "disconnects. A burst of writes to one file is one modify. Bounded: watches per "
                                   "sandbox and directories per watch (429), events kept between polls (overflow).",
                    "parameters": [
                        _file_path(True, "the directory to watch"),
                        {"name": "recursive", "in": "query", "required": False,
                         "schema": {"type": "boolean", "default": False}},
                        {"name": "timeout_s", "in": "query", "required": False,
                         "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600, "default": 60},
                         "description": "how long the stream lasts at most"}],
                    "responses": {"200": {"description": "One WatchEvent a line.", "content": {
                        "application/x-ndjson": {"schema": _ref("WatchEvent")}}}, **errors}},
        },
    }


def _lifecycle_paths(sandbox: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "/v1/sandboxes/{sandbox_id}/fork": {
            "parameters": sandbox,
            "post": {
                "operationId": "forkSandbox", "tags": ["sandboxes"], "summary": "Fork a sandbox into n copies",
                "description": "n new running sandboxes, each starting from this one's state at this moment: its "
                "Python objects, imported modules and files. The source keeps running, unchanged. Copies share "
                "memory copy-on-write, are isolated from each other and from the source, and are reseeded (kernel "
                "RNG, random, numpy) with the clock set. A copy can be forked again. A frozen source is resumed "
                "first. Refused up front (429, 507) when the copies would not fit; a fork that fails leaves no "
                "copies behind. The body may be empty (n = 1).",
                "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("ForkRequest")}}},
                "responses": {"201": {**_json(_ref("SandboxList"), "The n new sandboxes (metadata.forked_from "
                                                                   "names the source)."),
                                      "links": _links("$response.body#/sandboxes/0/id")},
                              **_errors(400, 401, 404, 409, 410, 413, 422, 429, 500, 507)},
            },
        },
        "/v1/sandboxes/{sandbox_id}/freeze": {
            "parameters": sandbox,
            "post": {
                "operationId": "freezeSandbox", "tags": ["sandboxes"], "summary": "Freeze a sandbox to disk",
                "description": "Writes the sandbox's whole state (memory, devices, files) under the service's "
                "state directory and stops its VM, releasing its memory. It survives service restarts and host "
                "reboots; an exec, a file call or POST .../resume restores it. Freezing a frozen sandbox is a "
                "no-op. A failed freeze leaves it running.",
                "responses": {"200": {**_json(_ref("Sandbox"), "Frozen (state frozen)."),
                                      "links": _links("$response.body#/id", ("resumeSandbox", "exec", "getSandbox",
                                                                              "forkSandbox", "deleteSandbox"))},
                              **_errors(401, 404, 409, 410, 500, 507)},
            },
        },
        "/v1/sandboxes/{sandbox_id}/resume": {
            "parameters": sandbox,
            "post": {
                "operationId": "resumeSandbox", "tags": ["sandboxes"], "summary": "Resume a frozen sandbox",
                "description": "Restores the process state exactly as frozen, with fresh entropy and the current "
                "time. Resuming a running sandbox is a no-op. Refused (422) when the snapshot was made by another "
                "QEMU version or guest image; a failed resume leaves it frozen.",
                "responses": {"200": {**_json(_ref("Sandbox"), "Running (state running)."),
                                      "links": _links("$response.body#/id", ("exec", "forkSandbox", "freezeSandbox",
                                                                              "deleteSandbox"))},
                              **_errors(401, 404, 410, 422, 429, 500, 507)},
            },
        },
    }


_SNAPSHOT_NAME = {
    "name": "name", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": SnapshotRequest.model_json_schema()["properties"]["name"]["pattern"],
               "maxLength": 64},
    "description": "The snapshot's name, as given to POST /v1/sandboxes/{sandbox_id}/snapshots.",
}


def _snapshot_paths(sandbox: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "/v1/sandboxes/{sandbox_id}/snapshots": {
            "parameters": sandbox,
            "post": {
                "operationId": "snapshotSandbox", "tags": ["snapshots"],
                "summary": "Save a sandbox's live state under a name",
                "description": "Saves the sandbox's whole live state (memory: its Python objects and processes; "
                "its files) as a snapshot named for this key; the sandbox keeps running, unchanged. Any number of "
                "sandboxes can then start from it (POST /v1/sandboxes {\"snapshot\": name}), as a fork's copies "
                "do: mapping its memory copy-on-write, reseeded, the clock set. A snapshot counts against the key's "
                "frozen share and the frozen quota (429, 507 up front); it lives on the node's memory filesystem "
                "and is lost if the host reboots. A failed snapshot leaves the sandbox as it was.",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("SnapshotRequest")}}},
                "responses": {"201": {**_json(_ref("Snapshot"), "Saved; Location names it."),
                                      "headers": {"Location": {"required": True, "schema": {"type": "string"},
                                                               "description": "/v1/snapshots/{name}"}},
                                      "links": {"GetSnapshot": {"operationId": "getSnapshot",
                                                                "parameters": {"name": "$response.body#/name"}},
                                                "DeleteSnapshot": {"operationId": "deleteSnapshot",
                                                                   "parameters": {"name": "$response.body#/name"}}}},
                              **_errors(400, 401, 404, 409, 410, 413, 422, 429, 500, 507)},
            },
        },
        "/v1/snapshots": {
            "get": {"operationId": "listSnapshots", "tags": ["snapshots"], "summary": "List this key's snapshots",
                    "responses": {"200": _json(_ref("SnapshotList"), "The caller's own snapshots, oldest first."),
                                  **_errors(401)}},
        },
        "/v1/snapshots/{name}": {
            "parameters": [_SNAPSHOT_NAME],
            "get": {"operationId": "getSnapshot", "tags": ["snapshots"], "summary": "Show a snapshot",
                    "responses": {"200": _json(_ref("Snapshot"), "The snapshot."), **_errors(401, 404, 422)}},
            "delete": {"operationId": "deleteSnapshot", "tags": ["snapshots"], "summary": "Delete a snapshot",
                       "description": "No new sandbox can start from it; its memory is freed when the last "
                                      "sandbox made from it is gone.",
                       "responses": {"204": {"description": "Deleted."}, **_errors(401, 404, 422)}},
        },
    }


def _responses() -> dict[str, Any]:
    responses = {}
    for status, text in _ERROR_TEXT.items():
        response: dict[str, Any] = _json(_ref("Error"), text)
        if status in _WITH_RETRY_AFTER:
            response["headers"] = {"Retry-After": {"required": True, "schema": {"type": "integer"},
                                                   "description": "seconds"}}
        responses[f"E{status}"] = response
    return responses


def _schemas(max_fork: int) -> dict[str, Any]:
    """The schemas with this service's own limits in them (a fuzzer or client then knows the real bounds)."""
    fork = copy.deepcopy(_SCHEMAS["ForkRequest"])
    fork["properties"]["n"]["maximum"] = max_fork
    return {**_SCHEMAS, "ForkRequest": fork}


def openapi_document(max_fork: int = DEFAULT_MAX_FORK) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "appliance execution API",
            "version": API_VERSION,
            "description": "Run Python in hardware-isolated microVMs that keep their state between calls. Every "
            "route but the probes and this description needs `Authorization: Bearer <key>`; each sandbox "
            "belongs to the key (by its id) that created it; /metrics needs a metrics key. "
            "Errors are JSON: {\"error\": {\"code\", \"message\"}}. "
            "Each response names the worker process that served it in X-Appliance-Worker, carries "
            "X-Request-Id (quoted in 500 messages and the service log) and Server-Timing (time in the app until "
            "the response headers).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "an API key from `appliance keys add`, "
                                                          "APPLIANCE_API_KEYS, the spec, or the key file "
                                                          "`appliance serve` wrote"}},
            "schemas": _schemas(max_fork),
            "responses": _responses(),
        },
        "paths": {**_paths(), **_snapshot_paths([_SANDBOX_ID])},
    }


class OpenApi:
    def __init__(self, max_fork: int = DEFAULT_MAX_FORK) -> None:
        self._body = json.dumps(openapi_document(max_fork), indent=2).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._body
        resp.content_type = falcon.MEDIA_JSON

"""The OpenAPI description of the commands routes (service/api/commands.py), merged into openapi.py's document."""

from __future__ import annotations

from typing import Any

from service.commands import MAX_OFFSET, MAX_READ, MAX_WAIT_S

from .request_models import CommandRequest, SignalRequest, StdinRequest


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_STATUS = {
    "type": "object",
    "required": ["command_id", "pid", "running", "exit_code", "signal", "timed_out", "cmd", "output_bytes",
                 "dropped_bytes"],
    "properties": {
        "command_id": {"type": "string", "examples": ["cmd-1"]},
        "pid": {"type": "integer", "description": "in the guest; also its process group"},
        "running": {"type": "boolean"},
        "exit_code": {"type": ["integer", "null"], "description": "null while running; negative: killed by that "
                                                                  "signal"},
        "signal": {"type": ["string", "null"], "description": "the signal that ended it, e.g. SIGTERM"},
        "timed_out": {"type": "boolean", "description": "killed at its timeout_s"},
        "cmd": {"type": "string", "description": "the command as given (first 200 characters)"},
        "output_bytes": {"type": "integer", "description": "bytes of output so far (stdout and stderr)"},
        "dropped_bytes": {"type": "integer", "description": "of those, pushed out of its output ring"},
    },
}
_CHUNK = {"type": "object", "required": ["stream", "data"], "properties": {
    "stream": {"enum": ["stdout", "stderr"]}, "data": {"type": "string"}}}
_FINAL = {
    "exit_code": {"type": ["integer", "null"]}, "signal": {"type": ["string", "null"]},
    "timed_out": {"type": "boolean"}, "dropped_bytes": {"type": "integer"},
}

SCHEMAS: dict[str, Any] = {
    "CommandRequest": CommandRequest.model_json_schema(),
    "StdinRequest": StdinRequest.model_json_schema(),
    "SignalRequest": SignalRequest.model_json_schema(),
    "CommandStatus": _STATUS,
    "CommandHandle": {"type": "object", "required": ["command_id", "pid"], "properties": {
        "command_id": {"type": "string"}, "pid": {"type": "integer"}}},
    "CommandList": {"type": "object", "required": ["commands"], "properties": {
        "commands": {"type": "array", "items": _ref("CommandStatus")}}},
    "CommandResult": {"type": "object", "required": ["command_id", "pid", "stdout", "stderr", "exit_code"],
                      "properties": {"command_id": {"type": "string"}, "pid": {"type": "integer"},
                                     "stdout": {"type": "string"}, "stderr": {"type": "string"}, **_FINAL}},
    "CommandEvent": {
        "description": "One line of a foreground command's stream (application/x-ndjson): started, then stdout/"
        "stderr pieces, then done (or error, if the service failed mid-stream).",
        "oneOf": [
            {"type": "object", "required": ["type", "command_id", "pid"], "properties": {
                "type": {"const": "started"}, "command_id": {"type": "string"}, "pid": {"type": "integer"}}},
            {"type": "object", "required": ["type", "data"], "properties": {
                "type": {"enum": ["stdout", "stderr"]}, "data": {"type": "string"}}},
            {"type": "object", "required": ["type", "exit_code"], "properties": {"type": {"const": "done"},
                                                                                 **_FINAL}},
            {"type": "object", "required": ["type", "error"], "properties": {"type": {"const": "error"},
                                                                             "error": {"type": "object"}}},
        ],
    },
    "CommandOutput": {"type": "object", "required": ["chunks", "offset", "next_offset", "dropped_bytes", "status"],
                      "properties": {
                          "chunks": {"type": "array", "items": _CHUNK},
                          "offset": {"type": "integer", "description": "offset of the first byte returned"},
                          "next_offset": {"type": "integer", "description": "ask for this offset next"},
                          "dropped_bytes": {"type": "integer",
                                            "description": "bytes from the offset asked for that had already left "
                                                           "the ring (skipped)"},
                          "status": _ref("CommandStatus")}},
    "StdinResult": {"type": "object", "required": ["written"], "properties": {"written": {"type": "integer"}}},
}

_COMMAND_ID = {"name": "command_id", "in": "path", "required": True,
               "schema": {"type": "string", "maxLength": 64, "pattern": "^[\\x21-\\x7e]+$"},
               "description": "The command's id, as returned when it started (cmd-N)."}
_WAIT = {"name": "wait_s", "in": "query", "required": False,
         "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S, "default": 0}}


def paths(sandbox: list[dict[str, Any]], errors) -> dict[str, Any]:
    """`errors` is openapi.py's _errors (one set of error responses for the whole document)."""
    item = [*sandbox, _COMMAND_ID]
    return {
        "/v1/sandboxes/{sandbox_id}/commands": {
            "parameters": sandbox,
            "post": {
                "operationId": "runCommand", "tags": ["commands"], "summary": "Run a command beside the REPL",
                "description": "Runs argv (or one bash line) as the sandbox's user, in cwd (default /data), with the "
                "sandbox's envs plus the command's. Commands do not wait for the REPL and the REPL does not wait "
                "for them. background: 201 with a handle; else 200 with its output when it ends (NDJSON events "
                "with Accept: application/x-ndjson; a client that goes away kills it). At most 16 commands run "
                "at once per sandbox (429 limit_reached, Retry-After); each keeps the last 1 MiB of its output.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref("CommandRequest")}}},
                "responses": {
                    "201": _json(_ref("CommandHandle"), "Started in the background."),
                    "200": {"description": "Ran in the foreground to its end.", "content": {
                        "application/json": {"schema": _ref("CommandResult")},
                        "application/x-ndjson": {"schema": _ref("CommandEvent")}}},
                    **errors(400, 401, 404, 409, 410, 413, 422, 429, 500, 507),
                },
            },
            "get": {"operationId": "listCommands", "tags": ["commands"], "summary": "List the sandbox's commands",
                    "responses": {"200": _json(_ref("CommandList"), "Running and finished (the last 64)."),
                                  **errors(401, 404, 409, 410, 422, 429, 500, 507)}},
        },
        "/v1/sandboxes/{sandbox_id}/commands/{command_id}": {
            "parameters": item,
            "get": {"operationId": "getCommand", "tags": ["commands"], "summary": "A command's status",
                    "description": "With wait_s: answers once the command has ended, or after wait_s.",
                    "parameters": [_WAIT],
                    "responses": {"200": _json(_ref("CommandStatus"), "Its status."),
                                  **errors(401, 404, 409, 410, 422, 429, 500, 507)}},
        },
        "/v1/sandboxes/{sandbox_id}/commands/{command_id}/output": {
            "parameters": item,
            "get": {"operationId": "readCommandOutput", "tags": ["commands"],
                    "summary": "Read a command's output from a byte offset",
                    "description": "stdout and stderr pieces in the order they came, from byte offset `offset` of "
                    "its whole output; pass next_offset back to read on (after a reconnect too). With wait_s: "
                    "waits for output past the offset, or the command's end.",
                    "parameters": [
                        {"name": "offset", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}},
                        {"name": "max", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_READ, "default": MAX_READ}},
                        _WAIT],
                    "responses": {"200": _json(_ref("CommandOutput"), "A page of output."),
                                  **errors(401, 404, 409, 410, 422, 429, 500, 507)}},
        },
        "/v1/sandboxes/{sandbox_id}/commands/{command_id}/stdin": {
            "parameters": item,
            "post": {"operationId": "writeCommandStdin", "tags": ["commands"], "summary": "Write to its stdin",
                     "description": "409 conflict once stdin is closed; 429 while 4 MiB written are still unread.",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref("StdinRequest")}}},
                     "responses": {"200": _json(_ref("StdinResult"), "Accepted."),
                                   **errors(400, 401, 404, 409, 410, 413, 422, 429, 500, 507)}},
        },
        "/v1/sandboxes/{sandbox_id}/commands/{command_id}/signal": {
            "parameters": item,
            "post": {"operationId": "signalCommand", "tags": ["commands"], "summary": "Signal a command",
                     "description": "Sends an allow-listed signal to the command's process group (a finished "
                                    "command: nothing is sent).",
                     "requestBody": {"required": False, "content": {"application/json": {
                         "schema": _ref("SignalRequest")}}},
                     "responses": {"202": _json(_ref("CommandStatus"), "Sent; its status now."),
                                   **errors(400, 401, 404, 409, 410, 413, 422, 429, 500, 507)}},
        },
    }

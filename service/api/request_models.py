"""Request bodies: read within the size limit, parsed as JSON, validated by pydantic; errors name the field."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

import falcon
from appliance_agent import commands as guest_commands
from appliance_agent import envs as guest_envs
from appliance_agent.protocol import MAX_DEPTH, nesting_depth
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import BadRequest, TooLarge
from service.snapshot_names import MAX_NAME, NAME_PATTERN

from .body_streams import is_chunked
from .error_responses import InvalidField

Model = TypeVar("Model", bound=BaseModel)
# Bounds on what a client may make the service hold and echo: metadata is returned by every list call.
MAX_METADATA_BYTES = 16 << 10
MAX_JSON_DEPTH = MAX_DEPTH


def json_number(value: Any) -> Any:
    """A number as JSON Schema means it: 3 and 3.0 are the same number; "3" and true are not numbers (pydantic's
    lax int takes both, its strict int refuses 3.0, which any JSON encoder may write for a whole number)."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number")
    return value


# What an env map may hold, stated in the schema too (the agent's envs.py checks it again): names, the names the
# sandbox sets itself, the count, and no NUL in a value. Only the 64 KiB total is left to the check.
ENVS_SCHEMA: dict[str, Any] = {
    "propertyNames": {"pattern": guest_envs.NAME.pattern, "not": {"enum": sorted(guest_envs.RESERVED)}},
    "maxProperties": guest_envs.MAX_VARS,
    "additionalProperties": {"type": "string", "pattern": "^[^\\u0000]*$"},
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class CreateSandbox(_Body):
    template: str | None = Field(
        None, pattern=NAME_PATTERN, max_length=MAX_NAME,
        description="template to clone: null or 'default' (the service's warm template), or the name of a template "
        "an operator published (`appliance templates publish`); 404 if there is none of that name",
    )
    snapshot: str | None = Field(
        None, pattern=NAME_PATTERN, max_length=MAX_NAME,
        description="the name of one of this key's snapshots (POST /v1/sandboxes/{id}/snapshots) to start from: "
        "its whole live state, reseeded, its clock set, in its size (not with template, vcpus or memory_mib); "
        "404 if this key has none of that name",
    )
    vcpus: int | None = Field(None, ge=1, le=64, description="virtual CPUs (default: the spec's guest.vcpus)")
    memory_mib: int | None = Field(
        None, ge=256, le=262144, description="guest memory in MiB (default: the spec's guest.memory_mib)"
    )
    timeout_s: float | None = Field(
        None, gt=0, le=7 * 86400,
        description="idle period in seconds: then the sandbox is closed, or frozen if persistent "
        "(default: service.sandbox_timeout_s)",
    )
    metadata: dict[str, Any] | None = Field(
        None, description=f"free-form JSON object kept with the sandbox (at most {MAX_METADATA_BYTES} bytes as JSON)"
    )
    persistent: bool = Field(
        False, strict=True,
        description="after timeout_s idle, freeze the sandbox to disk (its whole process state) instead of "
        "closing it; the next exec resumes it",
    )
    envs: dict[str, str] | None = Field(
        None, json_schema_extra=ENVS_SCHEMA,
        description="environment variables of the whole sandbox: every exec (Python's os.environ, bash) and "
        f"command sees them, and a fork, freeze and resume keep them. At most {guest_envs.MAX_VARS} names "
        f"([A-Za-z_][A-Za-z0-9_]*), {guest_envs.MAX_BYTES} bytes in all; values are never logged or echoed",
        examples=[{"API_TOKEN": "...", "MODE": "test"}],
    )
    network: dict[str, Any] | None = Field(
        None,
        description='what the sandbox may reach: {"egress": "none" | "all" | {"allow": ["10.1.2.0/24", '
        '"db.internal:5432", ...]}} (IPv4 CIDRs or addresses, or host names resolved on the host now, each with an '
        "optional :port). Enforced on the host, outside the VM. Left out or null: no network interface at all",
        examples=[{"egress": {"allow": ["10.1.2.0/24", "db.internal:5432"]}}],
    )


    _numbers = field_validator("vcpus", "memory_mib", "timeout_s", mode="before")(json_number)
    _envs = field_validator("envs", mode="before")(lambda value: checked_envs(value))

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
            raise ValueError(f"is larger than {MAX_METADATA_BYTES} bytes as JSON; keep bulk data in files")
        return value


class SnapshotRequest(_Body):
    name: str = Field(..., pattern=NAME_PATTERN, max_length=MAX_NAME,
                      description="the snapshot's name, this key's own: 1-64 of letters, digits, '.', '_', '-' "
                      "(starting with a letter or digit)")


class ForkRequest(_Body):
    n: int = Field(
        1, ge=1,
        description="how many copies to make (at most service.max_fork); each starts from the source's state now",
    )

    _whole_number = field_validator("n", mode="before")(json_number)


# States a caller can see (pooled sandboxes belong to nobody yet) and filter the list by.
VISIBLE_STATES = ("running", "frozen", "lost")


class ExecRequest(_Body):
    code: str = Field(..., description="Python source (or a bash script when language is bash)")
    language: Literal["python", "bash"] = Field("python", description="python (the persistent REPL) or bash")
    timeout_s: float | None = Field(
        None, gt=0, le=86400, description="time limit; on expiry KeyboardInterrupt, then the REPL worker is killed"
    )
    envs: dict[str, str] | None = Field(
        None, json_schema_extra=ENVS_SCHEMA,
        description="environment variables for this exec only (Python: os.environ while it runs; bash: its "
        "environment), over the sandbox's own; same rules as at create",
    )

    _number = field_validator("timeout_s", mode="before")(json_number)
    _envs = field_validator("envs", mode="before")(lambda value: checked_envs(value))


SIGNAL_NAMES = tuple(guest_commands.SIGNALS)  # the agent's allow-list


class CommandRequest(_Body):
    cmd: list[str] | str = Field(
        ..., description="the program and its arguments (argv, run as is), or one shell line (run by bash -c)",
        examples=[["python3", "-m", "http.server", "8000"], "make -j2 2>&1 | tail -n 20"],
        # what _command checks, stated for clients and the fuzzer (the generated schema would allow [] and "")
        json_schema_extra={"anyOf": [
            {"type": "array", "items": {"type": "string", "pattern": "^[^\\u0000]*$"}, "minItems": 1,
             "maxItems": 1024},
            {"type": "string", "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"},
        ]},
    )
    cwd: str | None = Field(None, max_length=4096, description="working directory (default /data)")
    envs: dict[str, str] | None = Field(None, json_schema_extra=ENVS_SCHEMA,
                                        description="environment variables for this command, over the "
                                                          "sandbox's own; same rules as at create")
    background: bool = Field(
        False, strict=True,
        description="true: answer at once with a handle (201 {command_id, pid}); false: run it to the end and "
        "answer with its output (JSON, or NDJSON events with Accept: application/x-ndjson)",
    )
    timeout_s: float | None = Field(None, gt=0, le=7 * 86400,
                                    description="the command's process group is killed (SIGKILL) after this long")

    _number = field_validator("timeout_s", mode="before")(json_number)
    _envs = field_validator("envs", mode="before")(lambda value: checked_envs(value))

    @field_validator("cmd")
    @classmethod
    def _command(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not 1 <= len(value) <= 1024:
            raise ValueError("as a list must hold 1 to 1024 strings")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        if any("\x00" in part for part in ([value] if isinstance(value, str) else value)):
            raise ValueError("must not contain NUL bytes")
        return value


class StdinRequest(_Body):
    data: str = Field("", description="text to write to the command's stdin (UTF-8, at most 1 MiB)")
    eof: bool = Field(False, strict=True, description="close stdin after the data (the program then sees EOF)")


class SignalRequest(_Body):
    signal: Literal[SIGNAL_NAMES] = Field(  # type: ignore[valid-type]
        "SIGTERM", description="sent to the command's process group"
    )


def checked_envs(value: Any) -> Any:
    """The guest's own rules for env maps (appliance_agent.envs), so the API refuses what the agent would."""
    try:
        return guest_envs.check(value)
    except guest_envs.EnvError as exc:
        raise ValueError(str(exc)) from None


def read_json(req: falcon.Request, limit: int) -> Any:
    """The request body as JSON; 413 past `limit` bytes (also for chunked bodies), 400 if it is not JSON."""
    if req.content_length is not None:
        if req.content_length > limit:
            raise TooLarge(f"request body of {req.content_length} bytes exceeds the {limit}-byte limit")
        raw = req.bounded_stream.read()
    else:
        raw = req.stream.read(limit + 1) if is_chunked(req) else b""
        if len(raw) > limit:
            raise TooLarge(f"request body exceeds the {limit}-byte limit")
    if not raw.strip():
        return {}
    too_deep = BadRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder's own limit, far deeper than ours
        raise too_deep from None
    if nesting_depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def parse(model: type[Model], data: Any) -> Model:
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"is not a known field (known: {', '.join(model.model_fields)})"
        elif error["type"] == "missing":
            message = "is required"
        raise InvalidField(field, message) from None

"""The sandbox tools a model can call, defined once: name, description and typed, bounded parameters of each.

Every form a provider or protocol wants is rendered from these definitions, never written by hand beside them:
JSON Schema for MCP (`inputSchema`) and Anthropic, OpenAI's strict function schema, Gemini's OpenAPI-dialect
declaration. `validate_arguments` checks a call against the same definitions (a model's arguments are untrusted
input), so the bounds a schema advertises are the bounds that hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# A sandbox id goes into a URL path: letters, digits, '-' and '_' only, so no id can name another route.
SANDBOX_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_SANDBOX_ID = re.compile(SANDBOX_ID_PATTERN)
MAX_CODE_CHARS = 1 << 20            # the service has its own limit (max_code_bytes); this bounds what we send
MAX_PATH_CHARS = 4096               # PATH_MAX
MAX_WRITE_CHARS = 2 << 20           # a file written from a tool call travels in the call itself
MAX_TIMEOUT_S = 3600.0
DEFAULT_READ_BYTES = 64 << 10
MAX_READ_BYTES = 1 << 20
MAX_LIST_ENTRIES = 1000
MAX_FORK = 16                       # per call: a model asking for more is more likely wrong than right


class ToolCallError(ValueError):
    """The tool call is not one that can run (unknown shape, other tool, missing or invalid arguments)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "string", "integer" or "number"
    description: str
    required: bool = False
    enum: tuple[str, ...] | None = None
    max_length: int | None = None
    pattern: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    default: Any = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    params: tuple[Param, ...]

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def _sandbox_id(what: str) -> Param:
    return Param("sandbox_id", "string", f"Id of the sandbox to {what}; leave it out for this session's sandbox "
                 "(created on first use).", max_length=64, pattern=SANDBOX_ID_PATTERN)


def _timeout(what: str) -> Param:
    return Param("timeout_s", "number", f"Time limit in seconds; the {what} is interrupted after it (default: the "
                 f"service's, 60 s unless the operator changed it; at most {MAX_TIMEOUT_S:g}).",
                 minimum=0, exclusive_minimum=True, maximum=MAX_TIMEOUT_S)


RUN_PYTHON = ToolSpec(
    "run_python",
    "Run Python code in a persistent sandbox (a Jupyter-like session in an isolated VM). Variables, imports and "
    "files persist between calls. numpy, pandas, scikit-learn, matplotlib and scipy are installed; there is no "
    "internet access. The result shows stdout, stderr, the value of the last expression, and any error. Use "
    "print() or end with an expression to see values; plt.show() reports figures as images.",
    (
        Param("code", "string", "Python source to run; the value of the last line, if an expression, is returned.",
              required=True, max_length=MAX_CODE_CHARS),
        _sandbox_id("run it in"),
        _timeout("code"),
    ),
)
RUN_COMMAND = ToolSpec(
    "run_command",
    "Run a shell command line with bash in the sandbox (the same machine and files as run_python; the working "
    "directory is /data). The result shows stdout, stderr and the exit code.",
    (
        Param("command", "string", "The bash command line, e.g. 'ls -la' or 'grep -c x data.csv'.", required=True,
              max_length=MAX_CODE_CHARS),
        _sandbox_id("run it in"),
        _timeout("command"),
    ),
)
WRITE_FILE = ToolSpec(
    "write_file",
    "Write a file in the sandbox, replacing it if it exists (parent directories are created). Relative paths are "
    "relative to /data.",
    (
        Param("path", "string", "Path of the file in the sandbox.", required=True, max_length=MAX_PATH_CHARS),
        Param("content", "string", "The file's content: text, or base64 when encoding is 'base64'.",
              required=True, max_length=MAX_WRITE_CHARS),
        Param("encoding", "string", "How content is given: 'utf-8' text (default) or 'base64' bytes.",
              enum=("utf-8", "base64"), default="utf-8"),
        _sandbox_id("write to"),
    ),
)
READ_FILE = ToolSpec(
    "read_file",
    "Read a file from the sandbox: UTF-8 text as it is, other bytes as base64 when encoding is 'base64'. Long files "
    "are cut at max_bytes.",
    (
        Param("path", "string", "Path of the file in the sandbox.", required=True, max_length=MAX_PATH_CHARS),
        Param("encoding", "string", "'utf-8' (default) returns text; 'base64' returns the bytes as base64.",
              enum=("utf-8", "base64"), default="utf-8"),
        Param("max_bytes", "integer", f"Read at most this many bytes (default {DEFAULT_READ_BYTES}, at most "
              f"{MAX_READ_BYTES}).", minimum=1, maximum=MAX_READ_BYTES, default=DEFAULT_READ_BYTES),
        _sandbox_id("read from"),
    ),
)
LIST_FILES = ToolSpec(
    "list_files",
    "List a directory in the sandbox: name, type and size of each entry, in name order. A long listing ends with "
    "a cursor: pass it back for the next entries.",
    (
        Param("path", "string", "The directory (default /data).", max_length=MAX_PATH_CHARS, default="/data"),
        Param("limit", "integer", f"At most this many entries (default 200, at most {MAX_LIST_ENTRIES}).",
              minimum=1, maximum=MAX_LIST_ENTRIES, default=200),
        Param("cursor", "string", "The cursor a previous listing of this directory ended with.", max_length=4096),
        _sandbox_id("list"),
    ),
)
FORK = ToolSpec(
    "fork",
    "Copy a sandbox's whole live state (variables, imported modules, files) into n new sandboxes, e.g. to try "
    "alternatives side by side. The source is unchanged. Returns the new sandboxes' ids: pass one as sandbox_id "
    "to use it.",
    (
        Param("n", "integer", f"How many copies (default 1, at most {MAX_FORK}).", minimum=1, maximum=MAX_FORK,
              default=1),
        _sandbox_id("copy"),
    ),
)
FREEZE = ToolSpec(
    "freeze",
    "Snapshot a sandbox's whole live state to disk and stop it (it then uses no memory). A frozen sandbox outlives "
    "this session; any later call that names its id, or resume, brings it back exactly as it was.",
    (_sandbox_id("freeze"),),
)
RESUME = ToolSpec(
    "resume",
    "Bring a frozen sandbox back now (any call naming it would resume it anyway).",
    (_sandbox_id("resume"),),
)
CLOSE = ToolSpec(
    "close",
    "Delete a sandbox and everything in it. Closing this session's sandbox means the next call starts a new one.",
    (_sandbox_id("close"),),
)

TOOLS: tuple[ToolSpec, ...] = (RUN_PYTHON, RUN_COMMAND, WRITE_FILE, READ_FILE, LIST_FILES, FORK, FREEZE, RESUME, CLOSE)
BY_NAME: dict[str, ToolSpec] = {tool.name: tool for tool in TOOLS}


# ---- renderings -------------------------------------------------------------------------------------------------

def json_schema(tool: ToolSpec) -> dict[str, Any]:
    """The full JSON Schema (2020-12) of the tool's arguments, bounds included: MCP's inputSchema."""
    properties: dict[str, Any] = {}
    for p in tool.params:
        prop: dict[str, Any] = {"type": p.type, "description": p.description}
        if p.enum is not None:
            prop["enum"] = list(p.enum)
        if p.type == "string" and p.required:
            prop["minLength"] = 1
        if p.max_length is not None:
            prop["maxLength"] = p.max_length
        if p.pattern is not None:
            prop["pattern"] = p.pattern
        if p.minimum is not None:
            prop["exclusiveMinimum" if p.exclusive_minimum else "minimum"] = p.minimum
        if p.maximum is not None:
            prop["maximum"] = p.maximum
        if p.default is not None:
            prop["default"] = p.default
        properties[p.name] = prop
    return {"type": "object", "properties": properties, "required": [p.name for p in tool.params if p.required],
            "additionalProperties": False}


def anthropic_tool(tool: ToolSpec) -> dict[str, Any]:
    schema = {k: v for k, v in json_schema(tool).items() if k != "additionalProperties"}
    return {"name": tool.name, "description": tool.description, "input_schema": schema}


def openai_parameters(tool: ToolSpec) -> dict[str, Any]:
    """OpenAI's strict mode: every property required (an optional one may be null), no extra properties, and only
    the keywords strict mode takes (the bounds are checked when the call runs)."""
    properties: dict[str, Any] = {}
    for p in tool.params:
        prop: dict[str, Any] = {"type": p.type if p.required else [p.type, "null"], "description": p.description}
        if p.enum is not None:
            prop["enum"] = list(p.enum) if p.required else [*p.enum, None]
        properties[p.name] = prop
    return {"type": "object", "properties": properties, "required": [p.name for p in tool.params],
            "additionalProperties": False}


def openai_tool(tool: ToolSpec) -> dict[str, Any]:
    """Chat Completions: tools=[...]."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": openai_parameters(tool), "strict": True}}


def openai_responses_tool(tool: ToolSpec) -> dict[str, Any]:
    """Responses API: tools=[...]."""
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": openai_parameters(tool), "strict": True}


def gemini_function_declaration(tool: ToolSpec) -> dict[str, Any]:
    """Gemini's schema dialect is OpenAPI's: upper-case types, no additionalProperties."""
    properties: dict[str, Any] = {}
    for p in tool.params:
        prop: dict[str, Any] = {"type": p.type.upper(), "description": p.description}
        if p.enum is not None:
            prop["enum"] = list(p.enum)
        properties[p.name] = prop
    return {"name": tool.name, "description": tool.description,
            "parameters": {"type": "OBJECT", "properties": properties,
                           "required": [p.name for p in tool.params if p.required]}}


# ---- validation -------------------------------------------------------------------------------------------------

def validate_arguments(tool: ToolSpec, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments with defaults filled in, or ToolCallError naming what is wrong. A null counts as left out
    (OpenAI's strict mode sends null for every optional argument not given)."""
    known = {p.name for p in tool.params}
    unknown = sorted(str(name)[:64] for name in arguments if name not in known)
    if unknown:
        raise ToolCallError(f"{tool.name} takes no argument {', '.join(map(repr, unknown))}; it takes "
                            f"{', '.join(sorted(known))}")
    checked: dict[str, Any] = {}
    for p in tool.params:
        value = arguments.get(p.name)
        if value is None:
            if p.required:
                raise ToolCallError(f"the {tool.name} call has no '{p.name}' {p.type}")
            checked[p.name] = p.default
            continue
        checked[p.name] = _check(tool, p, value)
    return checked


def _check(tool: ToolSpec, p: Param, value: Any) -> Any:
    where = f"{tool.name}: '{p.name}'"
    if p.type == "string":
        if not isinstance(value, str):
            raise ToolCallError(f"{where} must be a string")
        if p.required and not value.strip():
            raise ToolCallError(f"the {tool.name} call has no '{p.name}' {p.type} (it is empty)")
        if p.max_length is not None and len(value) > p.max_length:
            raise ToolCallError(f"{where} is {len(value)} characters; at most {p.max_length}")
        if p.enum is not None and value not in p.enum:
            raise ToolCallError(f"{where} must be one of {', '.join(p.enum)}")
        if p.pattern == SANDBOX_ID_PATTERN and not _SANDBOX_ID.match(value):
            raise ToolCallError(f"{where} is not a sandbox id (like sb-3f9c0a1b2c3d4e5f)")
        return value
    # JSON has one number type; true/false are not numbers, and an integer parameter takes 3 or 3.0, not 3.5.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolCallError(f"{where} must be a number")
    if p.type == "integer":
        if value != int(value):
            raise ToolCallError(f"{where} must be a whole number")
        value = int(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ToolCallError(f"{where} must be a finite number")
    if p.minimum is not None and (value <= p.minimum if p.exclusive_minimum else value < p.minimum):
        raise ToolCallError(f"{where} must be {'more than' if p.exclusive_minimum else 'at least'} {p.minimum:g}")
    if p.maximum is not None and value > p.maximum:
        raise ToolCallError(f"{where} must be at most {p.maximum:g}")
    return value

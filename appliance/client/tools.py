"""The `run_python` tool for LLM applications: its declaration in OpenAI, Anthropic and Gemini formats, and one
function that runs a tool call from any of them in a Sandbox and returns the tool result as text.

    from appliance.client import Sandbox
    from appliance.client.tools import OPENAI_TOOL, run_tool_call
    tools = [OPENAI_TOOL]                       # or ANTHROPIC_TOOL, or GEMINI_TOOL
    ... the model answers with a tool call ...
    text = run_tool_call(call, sandbox)         # the call as the provider's JSON (dict) or SDK object
"""

from __future__ import annotations

import json
from typing import Any

from .sandbox import Execution, Sandbox

TOOL_NAME = "run_python"
TOOL_DESCRIPTION = (
    "Run Python code in a persistent sandbox (a Jupyter-like session in an isolated VM). Variables, imports and "
    "files persist between calls. numpy, pandas, scikit-learn, matplotlib and scipy are installed; there is no "
    "internet access. The result shows stdout, stderr, the value of the last expression, and any error. Use "
    "print() or end with an expression to see values; plt.show() reports figures as images."
)
CODE_DESCRIPTION = "Python source to run; the value of the last line, if an expression, is returned."
MAX_RESULT_CHARS = 20_000

_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": CODE_DESCRIPTION}},
    "required": ["code"],
    "additionalProperties": False,
}

# OpenAI Chat Completions (and every OpenAI-compatible endpoint): tools=[OPENAI_TOOL]
OPENAI_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": _JSON_SCHEMA, "strict": True},
}
# OpenAI Responses API: tools=[OPENAI_RESPONSES_TOOL]
OPENAI_RESPONSES_TOOL: dict[str, Any] = {
    "type": "function", "name": TOOL_NAME, "description": TOOL_DESCRIPTION, "parameters": _JSON_SCHEMA,
    "strict": True,
}
# Anthropic Messages API: tools=[ANTHROPIC_TOOL]
ANTHROPIC_TOOL: dict[str, Any] = {
    "name": TOOL_NAME,
    "description": TOOL_DESCRIPTION,
    "input_schema": {k: v for k, v in _JSON_SCHEMA.items() if k != "additionalProperties"},
}
# Gemini (generateContent REST): tools=[GEMINI_TOOL]; its schema dialect is OpenAPI's, with upper-case types.
GEMINI_FUNCTION_DECLARATION: dict[str, Any] = {
    "name": TOOL_NAME,
    "description": TOOL_DESCRIPTION,
    "parameters": {
        "type": "OBJECT",
        "properties": {"code": {"type": "STRING", "description": CODE_DESCRIPTION}},
        "required": ["code"],
    },
}
GEMINI_TOOL: dict[str, Any] = {"function_declarations": [GEMINI_FUNCTION_DECLARATION]}


class ToolCallError(ValueError):
    """The tool call is not one this module can run (unknown shape, other tool, no code)."""


def parse_tool_call(call: Any) -> tuple[str, dict[str, Any]]:
    """(tool name, arguments) from a tool call in any supported format:

    - OpenAI Chat: {"id", "type": "function", "function": {"name", "arguments": "<json>"}}
    - OpenAI Responses: {"type": "function_call", "call_id", "name", "arguments": "<json>"}
    - Anthropic: {"type": "tool_use", "id", "name", "input": {...}}
    - Gemini: {"functionCall": {"name", "args": {...}}} (a part), {"function_call": ...}, or {"name", "args"}
    SDK objects (openai, anthropic, google-genai) are accepted too: they are converted with model_dump()/to_dict().
    """
    call = _as_dict(call)
    if not isinstance(call, dict):
        raise ToolCallError(f"a tool call must be a JSON object, not {type(call).__name__}")
    if isinstance(call.get("function"), dict):  # OpenAI Chat
        return _named(call["function"].get("name")), _arguments(call["function"].get("arguments"))
    for key in ("functionCall", "function_call"):  # Gemini part
        if isinstance(call.get(key), dict):
            return _named(call[key].get("name")), _arguments(call[key].get("args", {}))
    if call.get("type") == "tool_use" or "input" in call:  # Anthropic
        return _named(call.get("name")), _arguments(call.get("input", {}))
    if "arguments" in call:  # OpenAI Responses
        return _named(call.get("name")), _arguments(call["arguments"])
    if "args" in call:  # Gemini FunctionCall
        return _named(call.get("name")), _arguments(call["args"])
    raise ToolCallError(f"not a tool call in a known format (keys: {sorted(call)})")


def run_tool_call(call: Any, sandbox: Sandbox, timeout: float | None = None,
                  max_chars: int = MAX_RESULT_CHARS) -> str:
    """Run a `run_python` tool call in `sandbox`; the text to send back to the model as the tool's result.

    Problems with the call itself (wrong tool, bad arguments) come back as text too, so the model can fix them."""
    try:
        name, arguments = parse_tool_call(call)
        if name != TOOL_NAME:
            raise ToolCallError(f"unknown tool {name!r}; the only tool is {TOOL_NAME}")
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolCallError("the run_python call has no 'code' string")
    except ToolCallError as exc:
        return f"[tool call error] {exc}"
    return format_execution(sandbox.run_code(code, timeout=timeout), max_chars)


def format_execution(execution: Execution, max_chars: int = MAX_RESULT_CHARS) -> str:
    """An execution as plain text for a model: stdout, stderr, outputs, error; long output cut in the middle."""
    parts: list[str] = []
    if execution.stdout:
        parts.append(f"[stdout]\n{execution.stdout.rstrip()}")
    if execution.stderr:
        parts.append(f"[stderr]\n{execution.stderr.rstrip()}")
    has_value = execution.text is not None and bool(execution.results)
    displays = execution.results[:-1] if has_value else execution.results
    for bundle in displays:
        kinds = [kind for kind in bundle if kind != "text/plain"]
        if kinds:
            parts.append(f"[display: {', '.join(kinds)}] {bundle.get('text/plain', '')}".rstrip())
        elif "text/plain" in bundle:
            parts.append(f"[display]\n{bundle['text/plain']}")
    if execution.text is not None:
        kinds = [kind for kind in (execution.results[-1] if has_value else {}) if kind != "text/plain"]
        also = f" (also as {', '.join(kinds)})" if kinds else ""
        parts.append(f"[result{also}]\n{execution.text}")
    if execution.truncated_bytes:
        parts.append(f"[note] {execution.truncated_bytes} bytes of output were dropped")
    if execution.worker_restarted:
        parts.append("[note] the code did not stop when interrupted; the Python session was restarted and "
                     "earlier variables are gone")
    if execution.error is not None:
        parts.append(f"[error]\n{execution.error}")
    if execution.exit_code not in (None, 0):
        parts.append(f"[exit code] {execution.exit_code}")
    text = "\n".join(parts) if parts else "[no output]"
    if len(text) > max_chars:
        half = max_chars // 2
        text = f"{text[:half]}\n[... {len(text) - max_chars} characters cut ...]\n{text[-half:]}"
    return text


def _as_dict(call: Any) -> Any:
    for method in ("model_dump", "to_dict", "to_json_dict"):
        if not isinstance(call, dict) and hasattr(call, method):
            return getattr(call, method)()
    return call


def _named(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ToolCallError("the tool call has no name")
    return name


def _arguments(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ToolCallError(f"the arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ToolCallError("the arguments must be a JSON object")
    return arguments

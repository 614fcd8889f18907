"""The sandbox tools for LLM applications: their declarations in OpenAI, Anthropic and Gemini formats, and one
function that runs a tool call from any of them and returns the tool result as text.

    from appliance.client import Sandbox
    from appliance.client.tools import OPENAI_TOOLS, run_tool_call
    tools = OPENAI_TOOLS                        # or ANTHROPIC_TOOLS, GEMINI_TOOLS; OPENAI_TOOL: run_python alone
    ... the model answers with a tool call ...
    text = run_tool_call(call, sandbox)         # the call as the provider's JSON (dict) or SDK object

The tools (run_python, run_command, write_file, read_file, list_files, fork, freeze, resume, close) are defined
once in appliance.client.tool_specs; `appliance mcp` serves the same definitions over MCP.
"""

from __future__ import annotations

import json
from typing import Any

from . import tool_specs
from .sandbox import Sandbox
from .tool_session import MAX_RESULT_CHARS, ToolSession, format_command, format_execution
from .tool_specs import ToolCallError

TOOL_NAME = tool_specs.RUN_PYTHON.name
TOOL_DESCRIPTION = tool_specs.RUN_PYTHON.description
CODE_DESCRIPTION = tool_specs.RUN_PYTHON.param("code").description

# OpenAI Chat Completions (and every OpenAI-compatible endpoint): tools=[OPENAI_TOOL] or tools=OPENAI_TOOLS
OPENAI_TOOL: dict[str, Any] = tool_specs.openai_tool(tool_specs.RUN_PYTHON)
OPENAI_TOOLS: list[dict[str, Any]] = [tool_specs.openai_tool(tool) for tool in tool_specs.TOOLS]
# OpenAI Responses API: tools=[OPENAI_RESPONSES_TOOL] or tools=OPENAI_RESPONSES_TOOLS
OPENAI_RESPONSES_TOOL: dict[str, Any] = tool_specs.openai_responses_tool(tool_specs.RUN_PYTHON)
OPENAI_RESPONSES_TOOLS: list[dict[str, Any]] = [tool_specs.openai_responses_tool(t) for t in tool_specs.TOOLS]
# Anthropic Messages API: tools=[ANTHROPIC_TOOL] or tools=ANTHROPIC_TOOLS
ANTHROPIC_TOOL: dict[str, Any] = tool_specs.anthropic_tool(tool_specs.RUN_PYTHON)
ANTHROPIC_TOOLS: list[dict[str, Any]] = [tool_specs.anthropic_tool(tool) for tool in tool_specs.TOOLS]
# Gemini (generateContent REST): tools=[GEMINI_TOOL] or tools=GEMINI_TOOLS; its schema dialect is OpenAPI's.
GEMINI_FUNCTION_DECLARATION: dict[str, Any] = tool_specs.gemini_function_declaration(tool_specs.RUN_PYTHON)
GEMINI_TOOL: dict[str, Any] = {"function_declarations": [GEMINI_FUNCTION_DECLARATION]}
GEMINI_TOOLS: list[dict[str, Any]] = [
    {"function_declarations": [tool_specs.gemini_function_declaration(tool) for tool in tool_specs.TOOLS]}]

__all__ = [
    "ANTHROPIC_TOOL", "ANTHROPIC_TOOLS", "CODE_DESCRIPTION", "GEMINI_FUNCTION_DECLARATION", "GEMINI_TOOL",
    "GEMINI_TOOLS", "MAX_RESULT_CHARS", "OPENAI_RESPONSES_TOOL", "OPENAI_RESPONSES_TOOLS", "OPENAI_TOOL",
    "OPENAI_TOOLS", "TOOL_DESCRIPTION", "TOOL_NAME", "ToolCallError", "ToolSession", "format_command",
    "format_execution", "parse_tool_call", "run_tool_call",
]


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


def run_tool_call(call: Any, sandbox: Sandbox | ToolSession, timeout: float | None = None,
                  max_chars: int = MAX_RESULT_CHARS) -> str:
    """Run a tool call in `sandbox` (the default sandbox of the call; a `sandbox_id` argument names another of the
    same key) or in a ToolSession (which remembers fork copies and creates its sandbox on first use); the text to
    send back to the model as the tool's result.

    Problems with the call itself (unknown tool, bad arguments) come back as text too, so the model can fix them;
    what the API refuses raises ApplianceError, as every SDK call does."""
    session = sandbox if isinstance(sandbox, ToolSession) else ToolSession(
        sandbox, connect=sandbox.connect_other, max_chars=max_chars)
    try:
        name, arguments = parse_tool_call(call)
        return session.call(name, arguments, timeout=timeout).text
    except ToolCallError as exc:
        return f"[tool call error] {exc}"
    finally:
        if session is not sandbox:  # a session for this call only: let go of the other sandboxes it reached
            session.detach(keep=sandbox)


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

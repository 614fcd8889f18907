"""run_python tool declarations (OpenAI, Anthropic, Gemini) and running a tool call given in any of those formats."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from appliance.client import Execution, ExecutionError
from appliance.client.tools import (
    ANTHROPIC_TOOL,
    GEMINI_TOOL,
    OPENAI_RESPONSES_TOOL,
    OPENAI_TOOL,
    TOOL_NAME,
    format_execution,
    parse_tool_call,
    run_tool_call,
)

NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")
GEMINI_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"}
CODE = "import math\nmath.sqrt(16)"


class RecordingSandbox:
    id = "sb-recording"

    def __init__(self, execution: Execution | None = None) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.execution = execution or Execution(stdout="hi\n", results=[{"text/plain": "4.0"}], text="4.0")

    def run_code(self, code: str, timeout: float | None = None, stream: bool = False) -> Execution:
        self.calls.append((code, timeout))
        return self.execution

    def connect_other(self, sandbox_id: str):
        raise AssertionError(f"no other sandbox expected, got {sandbox_id}")


# ---- declarations ----------------------------------------------------------------------------------------------


def _accepts(schema: dict, instance: dict) -> bool:
    try:
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError:
        return False
    return True


# OpenAI's strict mode sends every argument, null for those not given
STRICT_NULLS = {"sandbox_id": None, "timeout_s": None}


@pytest.mark.parametrize(
    ("schema", "others"),
    [(OPENAI_TOOL["function"]["parameters"], STRICT_NULLS), (OPENAI_RESPONSES_TOOL["parameters"], STRICT_NULLS),
     (ANTHROPIC_TOOL["input_schema"], {})],
    ids=["openai", "openai-responses", "anthropic"],
)
def test_json_schema_declarations_are_valid_and_require_code(schema, others):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object"
    assert _accepts(schema, {"code": "1 + 1", **others})
    assert not _accepts(schema, {})
    assert not _accepts(schema, {"code": 5})


def test_openai_declaration_shape_and_strict_mode_rules():
    assert OPENAI_TOOL["type"] == "function"
    function = OPENAI_TOOL["function"]
    assert NAME.match(function["name"]) and function["name"] == TOOL_NAME and function["description"]
    # strict mode: every property required, no additional properties
    params = function["parameters"]
    assert set(params["required"]) == set(params["properties"]) and params["additionalProperties"] is False
    assert OPENAI_RESPONSES_TOOL["type"] == "function" and OPENAI_RESPONSES_TOOL["name"] == TOOL_NAME
    json.dumps(OPENAI_TOOL)


def test_anthropic_declaration_shape():
    assert set(ANTHROPIC_TOOL) == {"name", "description", "input_schema"}
    assert NAME.match(ANTHROPIC_TOOL["name"]) and ANTHROPIC_TOOL["description"]


def test_gemini_declaration_shape():
    (declaration,) = GEMINI_TOOL["function_declarations"]
    assert NAME.match(declaration["name"]) and declaration["name"] == TOOL_NAME and declaration["description"]

    def types(schema):
        yield schema["type"]
        for child in schema.get("properties", {}).values():
            yield from types(child)

    assert set(types(declaration["parameters"])) <= GEMINI_TYPES
    assert declaration["parameters"]["required"] == ["code"]
    assert "additionalProperties" not in json.dumps(GEMINI_TOOL)  # not part of Gemini's schema dialect


# ---- dispatch --------------------------------------------------------------------------------------------------

CALLS = {
    "openai-chat": {
        "id": "call_1",
        "type": "function",
        "function": {"name": "run_python", "arguments": json.dumps({"code": CODE})},
    },
    "openai-responses": {
        "type": "function_call",
        "call_id": "fc_1",
        "name": "run_python",
        "arguments": json.dumps({"code": CODE}),
    },
    "anthropic": {"type": "tool_use", "id": "toolu_1", "name": "run_python", "input": {"code": CODE}},
    "gemini-part": {"functionCall": {"name": "run_python", "args": {"code": CODE}}},
    "gemini-snake": {"function_call": {"name": "run_python", "args": {"code": CODE}}},
    "gemini-call": {"name": "run_python", "args": {"code": CODE}},
}


@pytest.mark.parametrize("fmt", sorted(CALLS))
def test_dispatch_from_every_format(fmt):
    sandbox = RecordingSandbox()
    text = run_tool_call(CALLS[fmt], sandbox, timeout=5)
    assert sandbox.calls == [(CODE, 5)]
    assert text == "[stdout]\nhi\n[result]\n4.0"


def test_sdk_objects_are_accepted():
    class Dumpable:
        def model_dump(self):
            return CALLS["anthropic"]

    assert parse_tool_call(Dumpable()) == ("run_python", {"code": CODE})


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        ({"type": "tool_use", "name": "search_web", "input": {"q": "x"}}, "unknown tool"),
        ({"function": {"name": "run_python", "arguments": "{not json"}}, "not valid JSON"),
        ({"function": {"name": "run_python", "arguments": "{}"}}, "no 'code'"),
        ({"hello": "world"}, "known format"),
        ("run_python", "JSON object"),
    ],
)
def test_bad_calls_come_back_as_text_for_the_model(call, problem):
    sandbox = RecordingSandbox()
    text = run_tool_call(call, sandbox)
    assert text.startswith("[tool call error]") and problem in text
    assert sandbox.calls == []


def test_result_text_shows_errors_outputs_and_cuts_long_text():
    execution = Execution(
        stdout="x" * 50_000,
        stderr="warn\n",
        results=[{"text/plain": "<Figure>", "image/png": "iVBOR"}],
        error=ExecutionError("ValueError", "bad", "Traceback ...\nValueError: bad"),
    )
    text = format_execution(execution, max_chars=2000)
    assert len(text) < 2100 and "characters cut" in text
    assert text.endswith("[error]\nTraceback ...\nValueError: bad")
    short = format_execution(Execution(results=[{"text/plain": "<Figure>", "image/png": "iVBOR"}]))
    assert short == "[display: image/png] <Figure>"
    assert format_execution(Execution()) == "[no output]"

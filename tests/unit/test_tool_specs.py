"""One definition of the sandbox tools (appliance.client.tool_specs) behind every form they take: the OpenAI, Anthropic
and Gemini declarations of the SDK, and the MCP server's tool list; the bounds a schema advertises are the bounds the
validator enforces."""

from __future__ import annotations

import json

import anyio
import jsonschema
import pytest
from mcp import Client

from appliance.client import tool_specs, tools
from appliance.client.tool_specs import TOOLS, ToolCallError, json_schema, validate_arguments
from appliance.mcp_server import Sessions, build_server

NAMES = [tool.name for tool in TOOLS]
ISSUE_TOOLS = {"run_python", "run_command", "write_file", "read_file", "list_files", "fork", "freeze", "resume",
               "close"}
# Keywords OpenAI's strict mode does not take (constraints are checked when the call runs instead)
OPENAI_STRICT_REFUSES = {"maxLength", "minLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "default"}


def _properties(schema: dict) -> dict:
    return schema["properties"]


def test_the_issue_s_tools_are_defined_once_each():
    assert set(NAMES) == ISSUE_TOOLS and len(NAMES) == len(set(NAMES))


def test_every_sdk_declaration_is_rendered_from_the_one_definition():
    gemini = tools.GEMINI_TOOLS[0]["function_declarations"]
    forms = {
        "openai": [(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                   for t in tools.OPENAI_TOOLS],
        "openai-responses": [(t["name"], t["description"], t["parameters"]) for t in tools.OPENAI_RESPONSES_TOOLS],
        "anthropic": [(t["name"], t["description"], t["input_schema"]) for t in tools.ANTHROPIC_TOOLS],
        "gemini": [(d["name"], d["description"], d["parameters"]) for d in gemini],
    }
    for form, declared in forms.items():
        assert [name for name, _, _ in declared] == NAMES, form
        for (name, description, schema), tool in zip(declared, TOOLS, strict=True):
            assert description == tool.description, (form, name)
            assert list(_properties(schema)) == [p.name for p in tool.params], (form, name)
            for param in tool.params:
                assert _properties(schema)[param.name]["description"] == param.description, (form, name)
    # the single run_python declarations (kept for existing users) are the first of the lists
    assert tools.OPENAI_TOOLS[0] == tools.OPENAI_TOOL and tools.ANTHROPIC_TOOLS[0] == tools.ANTHROPIC_TOOL
    assert gemini[0] == tools.GEMINI_FUNCTION_DECLARATION


@pytest.mark.parametrize("tool", TOOLS, ids=NAMES)
def test_each_form_follows_its_provider_s_rules(tool):
    full = json_schema(tool)
    jsonschema.Draft202012Validator.check_schema(full)
    assert full["additionalProperties"] is False
    anthropic = tool_specs.anthropic_tool(tool)["input_schema"]
    assert anthropic == {k: v for k, v in full.items() if k != "additionalProperties"}
    openai = tool_specs.openai_parameters(tool)
    jsonschema.Draft202012Validator.check_schema(openai)
    assert openai["required"] == list(openai["properties"]) and openai["additionalProperties"] is False
    assert not OPENAI_STRICT_REFUSES & {key for prop in openai["properties"].values() for key in prop}
    gemini = tool_specs.gemini_function_declaration(tool)["parameters"]
    assert {prop["type"] for prop in gemini["properties"].values()} <= {"STRING", "INTEGER", "NUMBER"}
    assert gemini["required"] == full["required"] and "additionalProperties" not in json.dumps(gemini)


def test_the_mcp_server_lists_the_same_schemas():
    async def listed() -> list:
        async with Client(build_server(Sessions(lambda: None))) as client:
            return (await client.list_tools()).tools

    mcp_tools = anyio.run(listed)
    assert [(t.name, t.description, t.input_schema) for t in mcp_tools] == \
        [(t.name, t.description, json_schema(t)) for t in TOOLS]


# Arguments at and past every bound: the validator and the advertised JSON Schema must agree on each.
SAMPLES = {
    "run_python": [{"code": "1"}, {}, {"code": ""}, {"code": 1}, {"code": "1", "timeout_s": 0},
                   {"code": "1", "timeout_s": 3600},
                   {"code": "1", "timeout_s": 3600.5}, {"code": "1", "timeout_s": True},
                   {"code": "1", "sandbox_id": "sb-12ab"}, {"code": "1", "sandbox_id": "../keys"},
                   {"code": "1", "sandbox_id": "sb/../x"}, {"code": "1", "sandbox_id": "x" * 65},
                   {"code": "x" * (tool_specs.MAX_CODE_CHARS + 1)}, {"code": "1", "other": 2}],
    "read_file": [{"path": "a"}, {"path": "a", "max_bytes": 0}, {"path": "a", "max_bytes": 1 << 20},
                  {"path": "a", "max_bytes": (1 << 20) + 1}, {"path": "a", "max_bytes": 2.5},
                  {"path": "a", "encoding": "latin-1"}, {"path": "a", "encoding": "base64"}],
    "fork": [{}, {"n": 1}, {"n": 16}, {"n": 17}, {"n": 0}, {"n": "2"}],
    "list_files": [{}, {"limit": 1000}, {"limit": 1001}, {"cursor": 5}],
    "close": [{}, {"sandbox_id": "sb-1"}, {"sandbox_id": ""}],
}


@pytest.mark.parametrize(("name", "arguments"), [(n, a) for n, samples in SAMPLES.items() for a in samples])
def test_the_validator_enforces_what_the_schema_advertises(name, arguments):
    tool = tool_specs.BY_NAME[name]
    advertised = jsonschema.Draft202012Validator(json_schema(tool)).is_valid(arguments)
    try:
        validate_arguments(tool, arguments)
        enforced = True
    except ToolCallError:
        enforced = False
    assert enforced == advertised


def test_openai_strict_nulls_are_left_out_arguments():
    tool = tool_specs.READ_FILE
    checked = validate_arguments(tool, {"path": "a", "encoding": None, "max_bytes": None, "sandbox_id": None})
    assert checked == {"path": "a", "encoding": "utf-8", "max_bytes": tool_specs.DEFAULT_READ_BYTES,
                       "sandbox_id": None}

"""MCP tools over stdio, against a server of our own (tests/agent/mcp_server.py): listing, calls, result
conversion, error results, a server that fails to start or dies mid-call, and a missing SDK."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest

from qwen35.agent import MCPClient, MCPError, MCPUnavailableError, ToolError, ToolUnavailableError
from qwen35.agent.mcp_tools import _clean_schema, parse_command, result_text
from tests.agent.conftest import server_command


def _walk(value):
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def test_tools_are_listed_as_openai_definitions(mcp_client):
    tools = {t.name: t for t in mcp_client.tools}
    assert set(tools) == {"calculator", "add", "fail", "stats", "picture", "whoami", "pid", "crash"}
    assert tools["calculator"].definition == {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression with whole numbers and the operators +, - and *.",
            "parameters": {"type": "object",
                           "properties": {"expression": {"description": "The expression to evaluate, such as 12 * "
                                                                        "34.", "type": "string"}},
                           "required": ["expression"]}}}
    add = tools["add"].definition["function"]
    assert add["description"] == "Add two whole numbers."
    assert add["parameters"]["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
    # pydantic's generated titles are gone everywhere
    assert not any("title" in node for t in tools.values() for node in _walk(t.definition["function"]["parameters"]))
    assert tools["picture"].definition["function"]["parameters"] == {"type": "object", "properties": {}}
    assert all(t.source == f"mcp: {mcp_client.servers[0].command}" for t in tools.values())


def test_calls_return_the_result_text(mcp_client):
    tools = {t.name: t for t in mcp_client.tools}
    assert tools["add"]({"a": 2, "b": 3}) == "5"
    assert tools["calculator"]({"expression": "123 * 45"}) == "5535"
    # structured content only: sent as JSON
    assert json.loads(tools["stats"]({"values": [1, 2, 6]})) == {"count": 3, "mean": 3.0}
    # an image becomes a placeholder line after the text
    assert tools["picture"]({}) == "a red square\n[image: image/png, 8 bytes, not shown]"


def test_error_results_raise_tool_error(mcp_client):
    tools = {t.name: t for t in mcp_client.tools}
    with pytest.raises(ToolError, match="boom"):
        tools["fail"]({"message": "boom"})
    with pytest.raises(ToolError, match="only whole numbers"):
        tools["calculator"]({"expression": "7 / 2"})
    with pytest.raises(ToolError, match="valid integer"):  # the server's own argument validation
        tools["add"]({"a": "x", "b": 1})
    assert tools["add"]({"a": 1, "b": 1}) == "2"  # the session is still fine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_environment_and_close_stops_the_server():
    client = MCPClient([server_command()], env={"QWEN35_TEST_SERVER_ENV": "from-the-client"})
    tools = {t.name: t for t in client.tools}
    assert tools["whoami"]({}) == "from-the-client"
    pid = int(tools["pid"]({}))
    assert _alive(pid)
    start = time.monotonic()
    client.close()
    client.close()  # idempotent
    assert time.monotonic() - start < 5
    assert not _alive(pid)  # exited (and reaped) by the time close returns
    with pytest.raises(MCPError, match="closed"):
        tools["add"]({"a": 1, "b": 2})


def test_a_server_that_dies_mid_call():
    with MCPClient([server_command()]) as client:
        tools = {t.name: t for t in client.tools}
        with pytest.raises(MCPError, match=r"MCP server '.*mcp_server.py' stopped working during a call to crash: "
                                           r"it closed the connection") as info:
            tools["crash"]({})
        assert isinstance(info.value, ToolUnavailableError)  # what makes the agent loop stop
        with pytest.raises(MCPError, match="is not running"):
            tools["add"]({"a": 1, "b": 2})


def test_servers_that_fail_to_start():
    with pytest.raises(MCPError, match=r"MCP server 'no-such-mcp-server --flag' failed to start: cannot run "
                                       r"'no-such-mcp-server'"):
        MCPClient(["no-such-mcp-server --flag"])
    script = "import sys; print('cannot open the database', file=sys.stderr); sys.exit(4)"
    with pytest.raises(MCPError, match=r"failed to start: it closed the connection .*its stderr ends: cannot open "
                                       r"the database"):
        MCPClient([[sys.executable, "-c", script]])
    # a process that never answers the handshake (and exits when its stdin closes, so the test stays quick)
    with pytest.raises(MCPError, match=r"no answer to the MCP handshake within 1 s"):
        MCPClient([[sys.executable, "-c", "import sys; sys.stdin.read()"]], startup_timeout=1)


def test_bad_commands():
    with pytest.raises(ValueError, match="No closing quotation"):
        parse_command("python 'server.py")
    with pytest.raises(ValueError, match="is empty"):
        MCPClient(["  "])
    assert parse_command("python 'my server.py' --flag") == ["python", "my server.py", "--flag"]


def test_two_servers_with_the_same_tool_names():
    with pytest.raises(MCPError, match="both offer a tool named"):
        MCPClient([server_command(), server_command()])


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mcp", None)  # `import mcp` now raises ImportError
    with pytest.raises(MCPUnavailableError, match=r"pip install 'qwen35\[mcp\]'") as info:
        MCPClient(["python server.py"])
    assert isinstance(info.value, ImportError)


def test_result_text_of_sdk_1x_style_objects():
    # SDK 1.x spells the fields in camelCase; the conversion reads both
    result = SimpleNamespace(
        content=[SimpleNamespace(type="text", text="first"),
                 SimpleNamespace(type="audio", data="AAAA", mimeType="audio/wav"),
                 SimpleNamespace(type="resource", resource=SimpleNamespace(uri="file:///a.txt", text="file text")),
                 SimpleNamespace(type="resource", resource=SimpleNamespace(uri="file:///b.bin", blob="AAAAAAAA",
                                                                           mimeType="application/octet-stream")),
                 SimpleNamespace(type="resource_link", uri="file:///c.txt", name="c")],
        structuredContent={"ignored": "the text blocks carry the answer"}, isError=True)
    text, is_error = result_text(result)
    assert is_error
    assert text.splitlines() == ["first", "[audio: audio/wav, 3 bytes, not shown]", "file text",
                                 "[resource file:///b.bin: application/octet-stream, 6 bytes, not shown]",
                                 "[resource link: file:///c.txt (c)]"]
    assert result_text(SimpleNamespace(content=[], structuredContent=None, isError=False)) == ("(no output)", False)
    long, _ = result_text(SimpleNamespace(content=[SimpleNamespace(type="text", text="x" * 500)]), limit=100)
    assert long.startswith("x" * 100) and "truncated: 500 characters" in long


def test_clean_schema_keeps_properties_named_title():
    schema = {"title": "bookArguments", "type": "object",
              "properties": {"title": {"title": "Title", "type": "string"},
                             "tags": {"type": "array", "items": {"title": "Tag", "type": "string"}}}}
    assert _clean_schema(schema) == {"type": "object", "properties": {"title": {"type": "string"},
                                                                      "tags": {"type": "array",
                                                                               "items": {"type": "string"}}}}

"""A tiny MCP stdio server for the tests: ``python tests/agent/mcp_server.py``.

Tools: ``calculator`` (named and described as in the embedded model's training data, qwen35/train/data.py),
``add``, ``fail`` (an error result), ``stats`` (structured content only), ``picture`` (text + an image),
``whoami`` (reads an environment variable), ``pid`` and ``crash`` (the process dies mid-call).  With ``--crash-on-call``
every tool ends the process instead of answering (a server that breaks while a model is using it).  Works with the
MCP SDK 2.x (``MCPServer``) and 1.x (``FastMCP``).
"""

from __future__ import annotations

import ast
import operator
import os
import sys
from typing import Annotated

from pydantic import Field

try:  # SDK 2.x
    from mcp.server.mcpserver import MCPServer as Server
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # SDK 1.x
    from mcp.server.fastmcp import FastMCP as Server
    from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent

server = Server("qwen35-test", log_level="WARNING")
CRASH_ON_CALL = "--crash-on-call" in sys.argv[1:]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ToolError("only whole numbers with +, - and * are supported")


@server.tool(description="Evaluate an arithmetic expression with whole numbers and the operators +, - and *.")
def calculator(expression: Annotated[str, Field(description="The expression to evaluate, such as 12 * 34.")]) -> str:
    if CRASH_ON_CALL:
        crash()
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot read {expression!r} as an expression") from None
    return str(_evaluate(tree.body))


@server.tool()
def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


@server.tool()
def fail(message: str) -> str:
    """Always fails with the given message."""
    raise ToolError(message)


@server.tool()
def stats(values: list[float]) -> CallToolResult:
    """Count and mean of some numbers, as structured content only."""
    result = {"count": len(values), "mean": sum(values) / len(values)}
    try:
        return CallToolResult(content=[], structured_content=result)
    except TypeError:  # SDK 1.x spells it structuredContent
        return CallToolResult(content=[], structuredContent=result)


@server.tool()
def picture() -> CallToolResult:
    """Some text and a small PNG."""
    image = {"type": "image", "data": "iVBORw0KGgo="}
    try:
        block = ImageContent(**image, mime_type="image/png")
    except ValueError:  # SDK 1.x (pydantic's ValidationError is a ValueError)
        block = ImageContent(**image, mimeType="image/png")
    return CallToolResult(content=[TextContent(type="text", text="a red square"), block])


@server.tool()
def whoami() -> str:
    """The value of QWEN35_TEST_SERVER_ENV in the server's environment."""
    return os.environ.get("QWEN35_TEST_SERVER_ENV", "(unset)")


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def crash() -> str:
    """Ends the server process in the middle of the call."""
    sys.stdout.flush()
    os._exit(3)


if __name__ == "__main__":
    server.run()

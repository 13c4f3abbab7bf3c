"""Tools and the agent loop: MCP servers' tools, a sandboxed Python interpreter, and :func:`run_agent`.

    from qwen35 import LLM
    from qwen35.agent import MCPClient, PythonTool, run_agent

    with MCPClient(["python my_server.py"]) as mcp:
        result = run_agent(LLM(), [{"role": "user", "content": "What is 123 * 45?"}], mcp.tools + [PythonTool()])
    print(result.content)

The MCP SDK is an optional extra (``pip install 'qwen35[mcp]'``), imported only when an :class:`MCPClient` is
made.  This package sits above ``qwen35.llm`` and below the CLI; it imports neither the server nor the CLI.
"""

from .loop import DECLINED, AgentEvent, AgentResult, run_agent
from .mcp_tools import MCPClient, MCPError, MCPUnavailableError
from .python_tool import PythonTool
from .tools import Tool, ToolError, ToolUnavailableError, check_arguments, format_call

__all__ = ["DECLINED", "AgentEvent", "AgentResult", "MCPClient", "MCPError", "MCPUnavailableError", "PythonTool",
           "Tool", "ToolError", "ToolUnavailableError", "check_arguments", "format_call", "run_agent"]

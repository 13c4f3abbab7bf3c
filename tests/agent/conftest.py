"""Fixtures for the agent tests: the test MCP server (tests/agent/mcp_server.py, run over stdio) and the embedded
model.  Starting a server costs a second or two (it imports the SDK), so the shared client lives for the session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SERVER_SCRIPT = Path(__file__).with_name("mcp_server.py")


def server_command(*extra: str) -> list[str]:
    """argv that starts the test server with this interpreter."""
    return [sys.executable, str(SERVER_SCRIPT), *extra]


@pytest.fixture(scope="session")
def mcp_client():
    from qwen35.agent import MCPClient

    client = MCPClient([server_command()])
    yield client
    client.close()


@pytest.fixture(scope="session")
def embedded_llm():
    import qwen35

    return qwen35.LLM()

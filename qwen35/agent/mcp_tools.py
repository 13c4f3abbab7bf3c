"""Tools from MCP servers: start stdio servers with the official MCP Python SDK and offer their tools.

    with MCPClient(["python my_server.py", "npx -y @modelcontextprotocol/server-filesystem /tmp"]) as mcp:
        print([t.name for t in mcp.tools])
        print(mcp.tools[0]({"a": 2, "b": 3}))

The SDK is asynchronous (asyncio + anyio) and its sessions must be entered and left in one task, while the agent
loop is plain synchronous code.  So an :class:`MCPClient` runs its own event loop on a background thread: one
long-lived task per server opens ``stdio_client`` + ``ClientSession``, does the handshake, lists the tools, then
waits for :meth:`MCPClient.close`; a tool call is a coroutine submitted to that loop, whose result the calling
thread waits for.  Closing ends every task, which closes each server's stdin and lets the SDK stop the process
(SIGTERM, then SIGKILL, if it does not exit by itself).

Each MCP tool becomes a :class:`~qwen35.agent.tools.Tool` with the server's ``inputSchema`` as its parameters
(pydantic's generated ``title`` fields dropped: they are noise to a small model).  A result's content becomes the
tool message text: text blocks as they are, images / audio / binary resources as a one-line placeholder, embedded
text resources as their text, and structured content as JSON when no text block carries it already.  A result
with ``isError`` raises :class:`~qwen35.agent.tools.ToolError` (the model is told); a server that will not start,
or dies, raises :class:`MCPError` naming its command, with the end of its stderr.

Works with SDK 1.x (camelCase fields) and 2.x (snake_case); install it with ``pip install 'qwen35[mcp]'``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shlex
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .tools import Tool, ToolError, ToolUnavailableError

__all__ = ["MCPClient", "MCPError", "MCPUnavailableError", "parse_command", "result_text"]

INSTALL_HINT = "pip install 'qwen35[mcp]'"

# What the chat template accepts as a function name (qwen35.chat.completion checks the same).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

_CONNECTION_CLOSED = -32000  # the SDK's code for "Connection closed" (mcp.types.CONNECTION_CLOSED)


class MCPError(ToolUnavailableError):
    """An MCP server failed to start or stopped working; the message names its command."""


class MCPUnavailableError(MCPError, ImportError):
    """The MCP Python SDK is not installed."""


def _sdk() -> tuple[Any, Any, Any]:
    try:
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client
    except ImportError as e:
        raise MCPUnavailableError(f"MCP tools need the MCP Python SDK ({e}); install it with {INSTALL_HINT}") from None
    return ClientSession, StdioServerParameters, stdio_client


def parse_command(command: str | Sequence[str]) -> list[str]:
    """'CMD ARGS' (split like a shell would, quotes and all) or an argv list -> argv; ValueError if empty/bad."""
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise ValueError(f"cannot read the MCP server command {command!r}: {e}") from None
    else:
        argv = [str(a) for a in command]
    if not argv or not argv[0]:
        raise ValueError(f"the MCP server command {command!r} is empty")
    return argv


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    """An attribute under its SDK 2.x (snake_case) or 1.x (camelCase) name."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def _clean_schema(schema: Any) -> Any:
    """The schema without the ``title`` keywords pydantic adds everywhere (``"title": "A"`` for a parameter a):
    they cost prompt tokens and tell the model nothing the property name does not.  Property *names* that happen
    to be "title" are kept: only schema objects are cleaned, never the ``properties`` maps themselves."""
    if isinstance(schema, list):
        return [_clean_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, Mapping):
            out[key] = {name: _clean_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = _clean_schema(value)
        else:
            out[key] = value
    return out


def _parameters(schema: Any) -> dict[str, Any]:
    schema = _clean_schema(dict(schema)) if isinstance(schema, Mapping) else {}
    # type and properties first, as OpenAI-style definitions (and the embedded model's training data) write them
    return {"type": schema.pop("type", "object"), "properties": schema.pop("properties", {}), **schema}


def _size(data: Any) -> str:
    if isinstance(data, str):  # base64 text -> the bytes it encodes
        n = len(data) * 3 // 4 - (len(data) - len(data.rstrip("=")))
    else:
        n = len(data or b"")
    return f"{n} bytes"


def result_text(result: Any, limit: int = 20000) -> tuple[str, bool]:
    """(the text the model reads, is an error) for an MCP ``CallToolResult``."""
    lines: list[str] = []
    has_text = False
    for block in _field(result, "content", default=None) or ():
        kind = _field(block, "type", default="?")
        if kind == "text":
            lines.append(block.text)
            has_text = True
        elif kind in ("image", "audio"):
            mime = _field(block, "mime_type", "mimeType", default="?")
            lines.append(f"[{kind}: {mime}, {_size(_field(block, 'data', default=''))}, not shown]")
        elif kind == "resource":
            resource = block.resource
            uri = _field(resource, "uri", default="?")
            text = _field(resource, "text", default=None)
            if text is not None:
                lines.append(text)
                has_text = True
            else:
                mime = _field(resource, "mime_type", "mimeType", default=None) or "binary"
                lines.append(f"[resource {uri}: {mime}, {_size(_field(resource, 'blob', default=''))}, not shown]")
        elif kind == "resource_link":
            name = _field(block, "name", default=None)
            lines.append(f"[resource link: {_field(block, 'uri', default='?')}" + (f" ({name})]" if name else "]"))
        else:
            lines.append(f"[{kind} content, not shown]")
    structured = _field(result, "structured_content", "structuredContent", default=None)
    if structured is not None and not has_text:  # the text blocks, when there are any, already serialize it
        lines.append(json.dumps(structured, ensure_ascii=False))
    text = "\n".join(lines) if lines else "(no output)"
    if len(text) > limit:
        text = text[:limit] + f"\n[... result truncated: {len(text)} characters in all]"
    return text, bool(_field(result, "is_error", "isError", default=False))


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as anyio's task groups wrap them."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _error_code(exc: BaseException) -> Any:
    code = getattr(exc, "code", None)  # SDK 2.x: MCPError.code
    if code is None:
        code = getattr(getattr(exc, "error", None), "code", None)  # SDK 1.x: McpError.error.code
    return code


def _connection_lost(exc: BaseException) -> bool:
    if _error_code(exc) == _CONNECTION_CLOSED:
        return True
    name = type(exc).__name__
    return name in ("ClosedResourceError", "BrokenResourceError", "EndOfStream") or isinstance(
        exc, (BrokenPipeError, ConnectionError))


def _describe(exc: BaseException, startup_timeout: float) -> str:
    exc = _leaf(exc)
    if isinstance(exc, FileNotFoundError):
        return f"cannot run {exc.filename or 'the command'!r}: no such file or command"
    if isinstance(exc, PermissionError):
        return f"cannot run {exc.filename or 'the command'!r}: permission denied"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"no answer to the MCP handshake within {startup_timeout:g} s"
    if _connection_lost(exc):
        return "it closed the connection (it exited or is not an MCP stdio server)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Server:
    """One stdio server: its command, its task on the client's loop, its session once connected."""

    def __init__(self, argv: list[str], command: str) -> None:
        self.argv = argv
        self.command = command
        self.errlog = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace", prefix="qwen35-mcp-")
        self.session: Any = None
        self.tools: list[Any] = []
        self.stop = asyncio.Event()  # set by close(); binds to the client's loop on first use (Python >= 3.10)
        self.task: concurrent.futures.Future | None = None
        self.broken: str | None = None  # why calls can no longer work

    def stderr_tail(self, limit: int = 300) -> str:
        try:
            fd = self.errlog.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, 4096, max(0, size - 4096)).decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in data.splitlines() if line.strip()]
        return lines[-1][-limit:] if lines else ""

    def failure(self, what: str, reason: str) -> MCPError:
        tail = self.stderr_tail()
        ending = f" (its stderr ends: {tail})" if tail else ""
        return MCPError(f"MCP server '{self.command}' {what}: {reason}{ending}")


class MCPClient:
    """Connections to one or more stdio MCP servers, and their tools (:attr:`tools`).

    ``commands``: each a shell-like string ``'CMD ARGS'`` or an argv list.  ``env``: extra environment variables
    for the servers (the SDK passes only a safe default set: HOME, PATH, USER, ...).  ``startup_timeout``: seconds
    for each server's start and handshake; ``call_timeout``: seconds a call may take (then the model is told it
    timed out).  Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, commands: Sequence[str | Sequence[str]], *, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 30.0, call_timeout: float = 300.0, max_result_chars: int = 20000) -> None:
        if isinstance(commands, str):
            commands = [commands]
        parsed = [(parse_command(c), c if isinstance(c, str) else shlex.join(parse_command(c))) for c in commands]
        self._sdk = _sdk()
        self.env = dict(env) if env else None
        self.startup_timeout, self.call_timeout = float(startup_timeout), float(call_timeout)
        self.max_result_chars = int(max_result_chars)
        self.servers = [_Server(argv, command) for argv, command in parsed]
        self.tools: list[Tool] = []
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qwen35-mcp", daemon=True)
        self._thread.start()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        ready = []
        for server in self.servers:
            done: concurrent.futures.Future = concurrent.futures.Future()
            server.task = asyncio.run_coroutine_threadsafe(self._serve(server, done), self._loop)
            ready.append(done)
        owner: dict[str, str] = {}
        for server, done in zip(self.servers, ready):  # servers start in parallel; wait for each in turn
            try:
                done.result(timeout=self.startup_timeout + 15)  # backstop: _serve times out by itself
            except concurrent.futures.TimeoutError:
                raise server.failure("failed to start", _describe(TimeoutError(), self.startup_timeout)) from None
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # what _serve stored, CancelledError included
                raise server.failure("failed to start", _describe(e, self.startup_timeout)) from None
            for spec in server.tools:
                tool = self._make_tool(server, spec)
                if tool.name in owner:
                    raise MCPError(f"MCP servers '{owner[tool.name]}' and '{server.command}' both offer a tool "
                                   f"named {tool.name!r}")
                owner[tool.name] = server.command
                self.tools.append(tool)

    async def _serve(self, server: _Server, ready: concurrent.futures.Future) -> None:
        ClientSession, StdioServerParameters, stdio_client = self._sdk
        try:
            params = StdioServerParameters(command=server.argv[0], args=server.argv[1:], env=self.env)
            async with stdio_client(params, errlog=server.errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    server.tools = await asyncio.wait_for(self._handshake(session), self.startup_timeout)
                    server.session = session
                    ready.set_result(None)
                    await server.stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            elif server.broken is None and not server.stop.is_set():
                server.broken = _describe(e, self.startup_timeout)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            server.session = None

    @staticmethod
    async def _handshake(session: Any) -> list[Any]:
        await session.initialize()
        tools: list[Any] = []
        cursor = None
        while True:  # tools/list is paginated
            page = await (session.list_tools(cursor=cursor) if cursor else session.list_tools())
            tools.extend(page.tools)
            cursor = _field(page, "next_cursor", "nextCursor", default=None)
            if not cursor:
                return tools

    def close(self) -> None:
        """Stop every server and the background loop (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for server in self.servers:
            self._loop.call_soon_threadsafe(server.stop.set)
        for server in self.servers:
            if server.task is not None:
                try:
                    server.task.result(timeout=10)  # the SDK gives a server 2 s to exit, then 2 s after SIGTERM
                except BaseException:
                    server.task.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        for server in self.servers:
            server.errlog.close()

    def __enter__(self) -> MCPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tools ----------------------------------------------------------------------------------------------------
    def _make_tool(self, server: _Server, spec: Any) -> Tool:
        name = spec.name
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise MCPError(f"MCP server '{server.command}' offers a tool named {name!r}, which the chat template "
                           "cannot express (1-128 letters, digits, '_', '-', '.' or ':')")
        schema = _field(spec, "input_schema", "inputSchema", default=None)
        description = _field(spec, "description", default=None) or _field(spec, "title", default=None) or ""

        def run(arguments: dict[str, Any]) -> str:
            return self.call(server, name, arguments)

        return Tool(name=name, description=description, parameters=_parameters(schema), function=run,
                    source=f"mcp: {server.command}", extra={"server": server.command})

    def call(self, server: _Server, name: str, arguments: Mapping[str, Any]) -> str:
        """Call tool ``name`` on ``server``; its result text, ToolError for an error result or a refused call,
        MCPError when the server is gone."""
        if self._closed:
            raise MCPError(f"MCP server '{server.command}': the connection was closed")
        if server.broken is not None or server.session is None:
            raise server.failure("is not running", server.broken or "it stopped")
        future = asyncio.run_coroutine_threadsafe(server.session.call_tool(name, dict(arguments)), self._loop)
        try:
            result = future.result(timeout=self.call_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(f"{name} did not answer within {self.call_timeout:g} s") from None
        except BaseException as e:
            future.cancel()
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            leaf = _leaf(e)
            if _connection_lost(leaf) or server.task is None or server.task.done():
                server.broken = "it closed the connection (it crashed or exited)"
                raise server.failure(f"stopped working during a call to {name}", server.broken) from None
            raise ToolError(f"{name}: {leaf}") from None  # a protocol-level refusal (bad params, unknown tool)
        text, is_error = result_text(result, self.max_result_chars)
        if is_error:
            raise ToolError(text)
        return text

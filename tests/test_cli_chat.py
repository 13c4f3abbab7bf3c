"""`qwen35 chat`, run in-process through qwen35.cli.main with a scripted stdin: the REPL's commands, tool calls
shown readably (never as XML), confirmation, and errors from MCP servers as one line with exit status 2.

The embedded model is loaded once and handed to every run; the MCP server is tests/agent/mcp_server.py."""

from __future__ import annotations

import sys

import pytest

from qwen35 import cli
from tests.agent.conftest import server_command

SERVER = " ".join(server_command())  # no spaces in these paths here; --mcp takes one shell-like string


@pytest.fixture(scope="module")
def embedded_llm():
    import qwen35

    return qwen35.LLM()


@pytest.fixture
def llm(embedded_llm, monkeypatch):
    """The shared model, with every prompt it is given recorded in ``llm.prompts``."""
    prompts: list[str] = []
    stream = embedded_llm.stream

    def recording_stream(prompt, params=None):
        prompts.append(prompt)
        return stream(prompt, params)

    monkeypatch.setattr(embedded_llm, "stream", recording_stream)
    monkeypatch.setattr(embedded_llm, "prompts", prompts, raising=False)
    monkeypatch.setattr(cli, "_load_llm", lambda args: embedded_llm)
    return embedded_llm


def run(monkeypatch, capsys, lines, *argv, tty=False):
    """main(["chat", *argv]) reading ``lines`` as the terminal input; (rc, stdout, stderr, the prompts shown)."""
    feed = iter(lines)
    asked: list[str] = []

    def fake_input(prompt=""):
        asked.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty, raising=False)
    rc = cli.main(["chat", "--max-tokens", "128", *argv])
    out, err = capsys.readouterr()
    return rc, out, err, asked


def test_help_describes_tools_and_commands(capsys):
    assert cli.main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--mcp 'CMD ARGS'", "--python-tool", "--yes", "--max-rounds", "/help", "/reset", "/think on|off",
                 "/tools", "/exit", "[tool call] calculator", "stdin is not", "unshare --net",
                 "pip install 'qwen35[mcp]'"):
        assert text in out, text


def test_commands_are_never_sent_to_the_model(llm, monkeypatch, capsys):
    rc, out, err, _ = run(monkeypatch, capsys, ["/help", "/nosuch thing", "/reset", "/think maybe", "/think off",
                                                "/think", "/tools", "/exit", "never read"])
    assert rc == 0
    assert llm.prompts == []
    for command in ("/help", "/reset", "/think on|off", "/tools", "/exit", "//text"):
        assert command in out  # /help lists them
    assert "unknown command /nosuch; the commands are: /help, /reset" in err
    assert "history cleared" in err
    assert "usage: /think on|off (got 'maybe')" in err
    assert err.count("thinking off") == 2  # set, then shown by /think alone
    assert "no tools (start the chat with --mcp 'CMD ARGS' or --python-tool)" in out


def test_reset_clears_the_history_and_slash_slash_escapes(llm, monkeypatch, capsys):
    rc, _, err, _ = run(monkeypatch, capsys, ["What is 2 + 3?", "//reset is a word", "/reset", "Hello"],
                          "--no-think")
    assert rc == 0 and len(llm.prompts) == 3
    assert "What is 2 + 3?" in llm.prompts[1] and "/reset is a word" in llm.prompts[1]  # the history grows...
    assert "What is 2 + 3?" not in llm.prompts[2] and "Hello" in llm.prompts[2]  # ...until /reset
    assert "history cleared" in err


def test_tool_calls_are_shown_readably(llm, monkeypatch, capsys):
    rc, out, err, asked = run(monkeypatch, capsys, ["/tools", "What is 123 * 45?"], "--mcp", SERVER,
                              "--python-tool", "--yes", "--no-think")
    assert rc == 0, err
    assert "python" in out and "built-in sandbox" in out and "calculator" in out and "mcp: " in out  # /tools
    assert '[tool call] calculator(expression="123 * 45")\n[tool result] 5535\n' in out
    assert "The answer is 5535." in out
    assert "<tool_call>" not in out and "<function=" not in out and "<parameter=" not in out
    assert asked == ["> ", "> ", "> "]  # --yes: no question asked
    assert "tools: python, calculator" in err


def test_calls_are_confirmed_on_a_terminal(llm, monkeypatch, capsys):
    rc, out, err, asked = run(monkeypatch, capsys, ["What is 123 * 45?", "maybe", "y"], "--mcp", SERVER,
                              "--no-think", tty=True)
    assert rc == 0, err
    assert asked[:3] == ["> ", "run calculator? [y/n] ", "run calculator? [y/n] "]  # asked again after "maybe"
    assert out.index('[tool call] calculator(expression="123 * 45")') < out.index("[tool result] 5535")


def test_calls_are_refused_without_a_terminal_or_yes(llm, monkeypatch, capsys):
    rc, out, err, asked = run(monkeypatch, capsys, [], "--mcp", SERVER, "--no-think", "-m", "What is 123 * 45?")
    assert rc == 0, err
    assert "not running calculator: stdin is not a terminal to ask on; pass --yes" in err
    assert "[tool call declined] calculator was not run" in out
    assert "[tool result]" not in out
    assert asked == []


def assert_one_error_line(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("qwen35 chat: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for fragment in fragments:
        assert fragment in errors[0]


def test_a_bad_mcp_command(llm, monkeypatch, capsys):
    rc, _, err, _ = run(monkeypatch, capsys, [], "--mcp", "no-such-mcp-server --port 3", "-m", "hi")
    assert_one_error_line(rc, err, "MCP server 'no-such-mcp-server --port 3' failed to start", "cannot run")
    assert err.count("\n") == 1 and llm.prompts == []  # nothing else: the model never ran
    rc, _, err, _ = run(monkeypatch, capsys, [], "--mcp", "python 'server.py", "-m", "hi")
    assert_one_error_line(rc, err, "cannot read the MCP server command", "No closing quotation")


def test_an_mcp_server_that_crashes(llm, monkeypatch, capsys):
    rc, out, err, _ = run(monkeypatch, capsys, [], "--mcp", f"{SERVER} --crash-on-call", "--yes", "--no-think",
                          "-m", "What is 123 * 45?")
    assert '[tool call] calculator(expression="123 * 45")' in out
    assert_one_error_line(rc, err, "stopped working during a call to calculator", "mcp_server.py --crash-on-call")

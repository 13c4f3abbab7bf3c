"""Tool calls whose values quote the tool-call format itself, and other output that breaks naive parsers.

Every case is checked three ways: the one-shot parse against the expected calls and content; the streaming parse at
every split of the text into two deltas, and character by character, against the one-shot result (content,
names, ids order, arguments); and each call's streamed argument fragments concatenated against its arguments,
which must be one JSON object without a repeated key.
"""

from __future__ import annotations

import json

import pytest

from qwen35.chat import ToolCallStreamParser, parse_tool_calls

WRITE = {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "string", "enum": ["w", "a"]}},
    "required": ["path", "content"]}}}
EDIT = {"type": "function", "function": {"name": "edit", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"},
    "options": {"type": "object"}, "lines": {"type": "array", "items": {"type": "integer"}},
    "count": {"type": "integer"}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}, "top_k": {"type": "integer"}}}}}
TOOLS = [WRITE, EDIT, SEARCH]


def call(name: str, *params: tuple[str, str], wrapper: bool = True) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    inner = f"<function={name}>\n{body}</function>"
    return f"<tool_call>\n{inner}\n</tool_call>" if wrapper else inner


# A file about tool calling: its body holds a whole call, closing tags and parameter headers.
FIXTURE = ('EXAMPLE = """\n' + call("write_file", ("path", "inner.txt"), ("content", "hi")) + '\n"""\n'
           "def parse(text):\n    return text.split('</parameter>')[0]\n")

CASES: dict[str, tuple[str, str, list[tuple[str, dict]]]] = {
    "file body quoting a whole call": (
        call("write_file", ("path", "fixture.py"), ("content", FIXTURE)),
        "", [("write_file", {"path": "fixture.py", "content": FIXTURE})]),
    "close tag followed by prose inside a value": (
        call("write_file", ("path", "doc.md"), ("content", "End a value with </parameter> and go on.\nMore.")),
        "", [("write_file", {"path": "doc.md", "content": "End a value with </parameter> and go on.\nMore."})]),
    "a given parameter's header quoted in a value": (
        call("write_file", ("path", "fixture.py"), ("content", "x\n</parameter>\n<parameter=path>\nliteral/value")),
        "", [("write_file", {"path": "fixture.py", "content": "x\n</parameter>\n<parameter=path>\nliteral/value"})]),
    "a header outside the schema quoted in a value": (
        call("write_file", ("path", "a"), ("content", "</parameter>\n<parameter=owner>\nroot")),
        "", [("write_file", {"path": "a", "content": "</parameter>\n<parameter=owner>\nroot"})]),
    "a header without the closing tag before it": (
        call("write_file", ("content", "see <parameter=path> below"), ("path", "b")),
        "", [("write_file", {"content": "see <parameter=path> below", "path": "b"})]),
    "function close followed by code": (
        call("write_file", ("path", "x.xml"), ("content", "<a>\n</function>\n<b/>\n</tool_call>\nend")),
        "", [("write_file", {"path": "x.xml", "content": "<a>\n</function>\n<b/>\n</tool_call>\nend"})]),
    "the next parameter after a quoted close": (
        call("write_file", ("content", "a </parameter> b"), ("mode", "a"), ("path", "p")),
        "", [("write_file", {"content": "a </parameter> b", "mode": "a", "path": "p"})]),
    "two calls back to back": (
        call("search", ("query", "cats")) + "\n" + call("search", ("query", "dogs"), ("top_k", "3")),
        "", [("search", {"query": "cats"}), ("search", {"query": "dogs", "top_k": 3})]),
    "prose between and after calls": (
        "First.\n" + call("search", ("query", "a")) + "\nThen.\n" + call("search", ("query", "b")) + "\nDone.",
        "First.\nThen.\nDone.", [("search", {"query": "a"}), ("search", {"query": "b"})]),
    "a quoted call, then the real close, then prose": (
        call("write_file", ("path", "f"), ("content", FIXTURE + "tail")) + "\nWritten.",
        "Written.", [("write_file", {"path": "f", "content": FIXTURE + "tail"})]),
    "unicode and characters JSON escapes": (
        call("write_file", ("path", "ünï/文件.txt"), ("content", 'tab\there "q" back\\slash \u0007 🙂 e\u0301')),
        "", [("write_file", {"path": "ünï/文件.txt", "content": 'tab\there "q" back\\slash \u0007 🙂 e\u0301'})]),
    "typed values among string ones": (
        call("edit", ("path", "m.py"), ("lines", "[1, 2, 3]"), ("options", '{"dry": true}'), ("count", "2"),
             ("old", "a</parameter>b"), ("new", "c")),
        "", [("edit", {"path": "m.py", "lines": [1, 2, 3], "options": {"dry": True}, "count": 2,
                       "old": "a</parameter>b", "new": "c"})]),
    "python literals for object and array": (
        call("edit", ("options", "{'dry': True, 'note': None, 'raw': true}"), ("lines", "[4, 5]")),
        "", [("edit", {"options": {"dry": True, "note": None, "raw": True}, "lines": [4, 5]})]),
    "without the tool_call wrapper": (
        call("search", ("query", "bare"), wrapper=False),
        "", [("search", {"query": "bare"})]),
    "without the wrapper after a line of prose": (
        "Searching now.\n" + call("search", ("query", "bare"), wrapper=False) + "\nOK.",
        "Searching now.\nOK.", [("search", {"query": "bare"})]),
    "a bare header inside a sentence is prose": (
        "Call <function=search> with a query.", "Call <function=search> with a query.", []),
    "a bare header of an unknown tool is prose": (
        "<function=rm_rf>\n<parameter=path>\n/\n</parameter>\n</function>",
        "<function=rm_rf>\n<parameter=path>\n/\n</parameter>\n</function>", []),
    "cut off inside a string value": (
        "<tool_call>\n<function=write_file>\n<parameter=path>\na.txt\n</parameter>\n<parameter=content>\nhalf a li",
        "", [("write_file", {"path": "a.txt", "content": "half a li"})]),
    "cut off inside a typed value": (
        "<tool_call>\n<function=edit>\n<parameter=path>\nq\n</parameter>\n<parameter=lines>\n[1, 2",
        "", [("edit", {"path": "q"})]),
    "cut off right after a closing tag": (
        "<tool_call>\n<function=search>\n<parameter=query>\nend\n</parameter>",
        "", [("search", {"query": "end"})]),
    "cut off inside a quoted closing tag": (
        "<tool_call>\n<function=search>\n<parameter=query>\nx </param",
        "", [("search", {"query": "x </param"})]),
    "cut off in the header": ("Text <tool_call>\n<function=sea", "Text <tool_call>\n<function=sea", []),
    "an empty value": (call("search", ("query", "")), "", [("search", {"query": ""})]),
    "a value of newlines only": (call("search", ("query", "\n\n")), "", [("search", {"query": "\n\n"})]),
    "nested tool_call inside a value, then another call": (
        call("write_file", ("path", "n"), ("content", "<tool_call>x</tool_call>")) + "\n" + call("search", ("query", "q")),
        "", [("write_file", {"path": "n", "content": "<tool_call>x</tool_call>"}), ("search", {"query": "q"})]),
}


def _no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"repeated key in {keys}"
    return dict(pairs)


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments, object_pairs_hook=_no_repeated_keys)) for c in calls]


def _stream(text: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], dict[int, str]]:
    parser = ToolCallStreamParser(TOOLS)
    content = ""
    fragments: dict[int, str] = {}
    for piece in pieces:
        delta = parser.feed(piece)
        content += delta.content
        for d in delta.tool_calls:
            fragments[d.index] = fragments.get(d.index, "") + d.arguments
    delta = parser.finish()
    content += delta.content
    for d in delta.tool_calls:
        fragments[d.index] = fragments.get(d.index, "") + d.arguments
    return content, [(c.name, c.arguments) for c in parser.calls], fragments


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_one_shot(case: str) -> None:
    text, content, expected = CASES[case]
    got_content, calls = parse_tool_calls(text, TOOLS)
    assert _calls(calls) == expected
    assert got_content == content


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_streaming_equals_one_shot_at_every_split(case: str) -> None:
    text = CASES[case][0]
    content, calls = parse_tool_calls(text, TOOLS)
    want = (content, [(c.name, c.arguments) for c in calls])
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        got_content, got_calls, fragments = _stream(text, pieces)
        assert (got_content, got_calls) == want, f"split {[len(p) for p in pieces][:3]}"
        assert [fragments.get(i, "") for i in range(len(got_calls))] == [a for _, a in got_calls]


def test_long_string_values_stream_before_their_closing_tag() -> None:
    parser = ToolCallStreamParser(TOOLS)
    sent = "".join(d.arguments for d in parser.feed(
        "<tool_call>\n<function=write_file>\n<parameter=path>\nbig.txt\n</parameter>\n<parameter=content>\n").tool_calls)
    for k in range(50):
        sent += "".join(d.arguments for d in parser.feed(f"line {k} </parameter> quoted\n").tool_calls)
    # everything but the trailing newline (which may precede the closing tag) has gone out
    assert sent.endswith(json.dumps("line 48 </parameter> quoted\nline 49 </parameter> quoted")[1:-1])
    sent += "".join(d.arguments for d in parser.feed("</parameter>\n</function>\n</tool_call>").tool_calls)
    sent += "".join(d.arguments for d in parser.finish().tool_calls)
    args = json.loads(sent)
    assert args["content"].count("quoted") == 50


def test_calls_stream_one_by_one() -> None:
    # the next <tool_call> ends the previous call at once, without waiting for the end of the output
    parser = ToolCallStreamParser(TOOLS)
    parser.feed(call("search", ("query", "one")) + "\n")
    assert parser.calls == []
    parser.feed("<tool_call>\n<function=search>")
    assert [c.name for c in parser.calls] == ["search"] and json.loads(parser.calls[0].arguments) == {"query": "one"}

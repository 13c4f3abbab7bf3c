"""The shipped Qwen3.5 chat template: exact prompts, parity with transformers, errors, validation."""

from __future__ import annotations

import copy
import json

import pytest

from qwen35.chat import ChatTemplateError, default_template_source, render_chat, validate_messages, validate_tools

# ---------------------------------------------------------------------------------------------
# the documented format, written out by hand

TOOL_INSTRUCTIONS = (
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n"
    "<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge and "
    "do not tell the user about function calls\n"
    "</IMPORTANT>"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather <now> & \"soon\" — 天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
# tojson: plain json.dumps, non-ASCII kept and no HTML escaping of < > &
TOOLS_JSON = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather <now> & \\"soon\\" — 天气", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}}}\n'
    '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}'
)
TOOLS_SYSTEM = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    + TOOLS_JSON + "\n</tools>\n\n" + TOOL_INSTRUCTIONS
)

THINK_OPEN = "<|im_start|>assistant\n<think>\n"
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_single_user_message_thinking_on_by_default():
    assert render_chat([{"role": "user", "content": "Hello"}]) == "<|im_start|>user\nHello<|im_end|>\n" + THINK_OPEN


def test_system_message_and_thinking_off():
    messages = [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "\nHello  "}]
    assert render_chat(messages, enable_thinking=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n" + THINK_OFF
    )


def test_no_generation_prompt():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render_chat(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
    )


def test_multi_turn_drops_reasoning_before_the_last_query():
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks"},
    ]
    assert render_chat(messages) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n" + THINK_OPEN
    )


def test_reasoning_after_the_last_query_is_kept():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "\n  Greet back.  \n"},
    ]
    expected = (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nGreet back.\n</think>\n\nHello!<|im_end|>\n"
    )
    assert render_chat(messages, add_generation_prompt=False) == expected
    # reasoning split out of the content, and under the alternative field names
    inline = [messages[0], {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"}]
    assert render_chat(inline, add_generation_prompt=False) == expected
    for key in ("reasoning", "thinking"):
        alias = [messages[0], {"role": "assistant", "content": "Hello!", key: "Greet back."}]
        assert render_chat(alias, add_generation_prompt=False) == expected


def test_tools_block_comes_before_the_system_message():
    messages = [{"role": "system", "content": "Be precise."}, {"role": "user", "content": "Weather in Paris?"}]
    assert render_chat(messages, tools=TOOLS) == (
        TOOLS_SYSTEM + "\n\nBe precise.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n" + THINK_OPEN
    )
    # without a system message the block ends right after the instructions
    assert render_chat(messages[1:], tools=TOOLS) == (
        TOOLS_SYSTEM + "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n" + THINK_OPEN
    )


TOOL_LOOP = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "reasoning_content": "Need both tools.",
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "metric": True,
                                                                "extra": None, "tags": ["a", "é"],
                                                                "opts": {"unit": "C"}}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": " Sunny, 21C \n"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "Rain"},
]

TOOL_LOOP_EXPECTED = (
    TOOLS_SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\nWeather in Paris and the time?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nNeed both tools.\n</think>\n\nLet me look.\n\n"
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n"
    "<parameter=metric>\nTrue\n</parameter>\n"  # non-JSON values go through |string
    "<parameter=extra>\nNone\n</parameter>\n"
    '<parameter=tags>\n["a", "é"]\n</parameter>\n'
    '<parameter=opts>\n{"unit": "C"}\n</parameter>\n'
    "</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_time>\n</function>\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nSunny, 21C\n</tool_response>\n<tool_response>\n14:05\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nRain\n</tool_response><|im_end|>\n"
)


def test_tool_loop_with_consecutive_tool_results():
    assert render_chat(TOOL_LOOP, tools=TOOLS) == TOOL_LOOP_EXPECTED + THINK_OPEN
    assert render_chat(TOOL_LOOP, tools=TOOLS, enable_thinking=False) == TOOL_LOOP_EXPECTED + THINK_OFF


def test_tool_call_arguments_as_json_string():
    as_strings = copy.deepcopy(TOOL_LOOP)
    for message in as_strings:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    assert render_chat(as_strings, tools=TOOLS) == render_chat(TOOL_LOOP, tools=TOOLS)


def test_finished_tool_loop_then_new_query_drops_its_reasoning():
    messages = TOOL_LOOP + [
        {"role": "assistant", "content": "Sunny in Paris.", "reasoning_content": "Summarise."},
        {"role": "user", "content": "Thanks!"},
    ]
    rendered = render_chat(messages, tools=TOOLS)
    assert "Need both tools." not in rendered and "Summarise." not in rendered
    assert "<|im_start|>assistant\nLet me look.\n\n<tool_call>" in rendered
    assert "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon" in rendered
    assert rendered.endswith(
        "<|im_start|>assistant\nSunny in Paris.<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n" + THINK_OPEN
    )


def test_user_message_wrapping_tool_responses_is_not_a_query():
    messages = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "Calling.", "reasoning_content": "r1"},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},
        {"role": "assistant", "content": "Done.", "reasoning_content": "r2"},
    ]
    assert render_chat(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nGo<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr1\n</think>\n\nCalling.<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nDone.<|im_end|>\n"
    )


def test_images_and_videos():
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "and"},
                                     {"type": "video", "video": "v.mp4"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/b.png"}},
                                     {"type": "text", "text": " compare"}]},
    ]
    image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    assert render_chat(messages) == (
        f"<|im_start|>user\n{image}and{video}<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
        f"<|im_start|>user\n{image} compare<|im_end|>\n" + THINK_OPEN
    )
    assert render_chat(messages, add_vision_id=True) == (
        f"<|im_start|>user\nPicture 1: {image}andVideo 1: {video}<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
        f"<|im_start|>user\nPicture 2: {image} compare<|im_end|>\n" + THINK_OPEN
    )


def test_media_objects_become_placeholders():
    class Picture:  # stands for a decoded image handed over by a Python caller
        def save(self, path):  # a template must not be able to reach this
            raise AssertionError("called from a template")

    messages = [{"role": "user", "content": [{"type": "image", "image": Picture()}, {"type": "text", "text": "?"}]}]
    assert validate_messages(messages)[0]["content"][0] == {"type": "image", "image": "<Picture>"}
    assert render_chat(messages) == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n" + THINK_OPEN


def test_rendering_does_not_touch_the_callers_messages():
    messages = copy.deepcopy(TOOL_LOOP)
    render_chat(messages, tools=TOOLS)
    assert messages == TOOL_LOOP


# ---------------------------------------------------------------------------------------------
# parity with transformers' apply_chat_template running the same template

PARITY_CASES = [
    ([{"role": "user", "content": "Hello"}], None),
    ([{"role": "system", "content": " sys "}, {"role": "user", "content": "Hi 中文 🚀"}], None),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"}], TOOLS),
    (TOOL_LOOP, TOOLS),
    (TOOL_LOOP + [{"role": "assistant", "content": "<think>done</think>It is sunny."},
                  {"role": "user", "content": "ok"}], TOOLS),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning": "s"}], None),
]


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.mark.parametrize("case", range(len(PARITY_CASES)))
@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_same_text_as_transformers(hf_tokenizer, qwen_tok, case, thinking, generation_prompt):
    messages, tools = PARITY_CASES[case]
    ours = render_chat(messages, tools=tools, enable_thinking=thinking, add_generation_prompt=generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=default_template_source(), tokenize=False,
        add_generation_prompt=generation_prompt, enable_thinking=thinking,
    )
    assert ours == theirs
    ids = hf_tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=default_template_source(), tokenize=True, return_dict=False,
        add_generation_prompt=generation_prompt, enable_thinking=thinking,
    )
    assert qwen_tok.encode(ours) == list(ids)


# ---------------------------------------------------------------------------------------------
# errors raised by the template


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
     "System message must be at the beginning."),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "No user query found in messages."),
    ([{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}], "No user query found in messages."),
    ([{"role": "system", "content": [{"type": "image", "image": "x.png"}]}, {"role": "user", "content": "u"}],
     "System message cannot contain images."),
])
def test_template_errors(messages, message):
    with pytest.raises(ChatTemplateError) as info:
        render_chat(messages)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_custom_template_errors():
    with pytest.raises(ChatTemplateError, match="^custom refusal$"):
        render_chat([{"role": "user", "content": "x"}], template="{{ raise_exception('custom refusal') }}")
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        render_chat([{"role": "user", "content": "x"}], template="{% if %}")
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        render_chat([{"role": "user", "content": "x"}], template="{{ messages.__class__.__mro__ }}{{ ''.join.x() }}")


def test_custom_template_helpers():
    template = (
        "{{ tools | tojson }}|{{ strftime_now('%Y') | length }}|"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}|{{ flavour }}"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "<é>", "parameters": {}}}]
    rendered = render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tools=tools,
                           template=template, flavour="x")
    assert rendered == '[{"type": "function", "function": {"name": "f", "description": "<é>", "parameters": {}}}]|4|b|x'


def test_sandbox_blocks_mutation():
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": "user", "content": "x"}], template="{{ messages.append(1) }}")


# ---------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("messages, pattern", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}], r"messages\[1\]\.role 'developer'"),
    ([{"content": "a"}], r"messages\[0\]\.role None"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be"),
    ([{"role": "user", "content": [{"type": "audio"}]}], r"messages\[0\]\.content\[0\]\.type 'audio'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"messages\[0\]\.content\[0\]\.text must be"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": {"x": 1}}],
     r"messages\[1\]\.tool_calls must be a list"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments must be a JSON object"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.name"),
    ([{"role": "user", "content": "a", "tool_calls": []}], r"messages\[0\]\.tool_calls is only allowed"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": 1}],
     r"messages\[1\]\.reasoning_content must be a string"),
    ([{"role": "user", "content": "a", "extra": object()}], r"messages\[0\]\.extra has an unsupported value"),
])
def test_invalid_messages(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_chat(messages)


@pytest.mark.parametrize("tools, pattern", [
    ({"type": "function"}, "tools must be a list"),
    ([WEATHER_TOOL, "x"], r"tools\[1\] must be an object"),
    ([{"type": "retrieval"}], r"tools\[0\]\.type must be 'function'"),
    ([{"type": "function", "function": "f"}], r"tools\[0\]\.function must be an object"),
    ([{"type": "function", "function": {"parameters": {}}}], r"tools\[0\]\.function\.name must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], r"tools\[0\]\.function\.parameters must"),
])
def test_invalid_tools(tools, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_chat([{"role": "user", "content": "a"}], tools=tools)


def test_validation_canonicalises():
    messages = validate_messages([
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "reasoning": "r",
         "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}]},
    ])
    assert messages[1]["reasoning_content"] == "r"
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    assert validate_tools([]) is None and validate_tools(None) is None
    assert validate_tools([TIME_TOOL]) == [TIME_TOOL]

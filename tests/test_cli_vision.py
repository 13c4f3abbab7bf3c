"""Pictures on the command line: `qwen35 chat --image/--video` and the REPL's /image, /video attach files to a
message (the answer is LLM.chat's on the same pictures); a text-only model refuses them in one line, exit status 2;
`qwen35 serve`'s picture flags reach serve() and are explained in --help.

Run in-process through qwen35.cli.main, with a tiny random multimodal checkpoint (tests/vision_checkpoint.py) and
a tiny random text-only one."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

import qwen35
from qwen35 import SamplingParams, cli
from tests.vision_checkpoint import build_text_checkpoint, build_vision_checkpoint, encoded, picture

REFUSAL = "this model cannot take images or videos: it has no vision tower (its config has no vision_config)"


@pytest.fixture(scope="module")
def vision_llm(tmp_path_factory):
    return qwen35.LLM(build_vision_checkpoint(tmp_path_factory.mktemp("vision_ckpt")), dtype="float32")


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    return qwen35.LLM(build_text_checkpoint(tmp_path_factory.mktemp("text_ckpt")), dtype="float32")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = {"a": folder / "a.png", "b": folder / "b b.png", "clip": folder / "clip.gif"}
    paths["a"].write_bytes(encoded(picture(0)))
    paths["b"].write_bytes(encoded(picture(1, (40, 90))))
    frames = [picture(10 + k, (40, 40)) for k in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=250, loop=0)
    paths["clip"].write_bytes(buf.getvalue())
    return paths


def use(llm, monkeypatch) -> list:
    """Make the CLI use ``llm``; returns the list every prompt it streams is recorded in."""
    prompts: list = []
    stream = type(llm).stream

    def recording_stream(prompt, params=None):
        prompts.append(prompt)
        return stream(llm, prompt, params)

    monkeypatch.setattr(llm, "stream", recording_stream)
    monkeypatch.setattr(cli, "_load_llm", lambda args: llm)
    return prompts


def run(monkeypatch, capsys, lines, *argv):
    """main(["chat", *argv]) reading ``lines`` as the terminal input; (rc, stdout, stderr)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    rc = cli.main(["chat", "--max-tokens", "6", "--temperature", "0", "--no-think", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def prompt_tokens(err: str) -> list[int]:
    return [int(n) for n in re.findall(r"prompt: (\d+) tokens", err)]


def expected(llm, content: list[dict]):
    return llm.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=6, temperature=0),
                    enable_thinking=False)


def assert_one_error_line(rc: int, err: str, command: str, *fragments: str) -> None:
    assert rc == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"qwen35 {command}: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_help_explains_the_picture_options(capsys):
    assert cli.main(["chat", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--image PATH", "--video PATH", "/image PATH", "/video PATH", "vision tower"):
        assert text in out, text
    assert cli.main(["serve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help texts
    for text in ("--allowed-local-media-path DIR", "inside DIR, and only there", "--allow-remote-media",
                 "hosts of its own network included", "--media-fetch-timeout SECONDS", "--max-image-pixels N",
                 "before decoding them", "data: URLs are always accepted", "image_url", "video_url"):
        assert text in out, text


def test_images_go_with_the_message(vision_llm, pictures, monkeypatch, capsys):
    prompts = use(vision_llm, monkeypatch)
    rc, out, err = run(monkeypatch, capsys, [], "--image", str(pictures["a"]), "--image", str(pictures["b"]),
                       "-m", "How many circles?")
    assert rc == 0, err
    assert len(prompts) == 1 and prompts[0]["multi_modal_data"] == {"image": [pictures["a"], pictures["b"]]}
    ref = expected(vision_llm, [{"type": "image", "image": str(pictures["a"])},
                                {"type": "image", "image": str(pictures["b"])},
                                {"type": "text", "text": "How many circles?"}])
    assert prompt_tokens(err) == [ref.usage["prompt_tokens"]]  # both pictures' tokens
    assert ref.content and ref.content in out


def test_a_video_goes_with_the_message(vision_llm, pictures, monkeypatch, capsys):
    prompts = use(vision_llm, monkeypatch)
    rc, _, err = run(monkeypatch, capsys, [], "--video", str(pictures["clip"]), "-m", "What happens?")
    assert rc == 0, err
    assert prompts[0]["multi_modal_data"] == {"video": [pictures["clip"]]}
    ref = expected(vision_llm, [{"type": "video", "video": str(pictures["clip"])},
                                {"type": "text", "text": "What happens?"}])
    assert prompt_tokens(err) == [ref.usage["prompt_tokens"]]


def test_image_in_the_repl(vision_llm, pictures, monkeypatch, capsys):
    prompts = use(vision_llm, monkeypatch)
    rc, out, err = run(monkeypatch, capsys, ["/image", "/image missing.png", f"/image {pictures['b']}", "/help",
                                             "What is it?", "And now?"])
    assert rc == 0, err
    assert "usage: /image PATH" in err
    assert "error: image missing.png: no such file" in err
    assert f"image {pictures['b']} attached to the next message (1 waiting)" in err  # a path with a space
    assert "/image PATH" in out and "/video PATH" in out  # /help
    # the picture goes with "What is it?"; the next turn resends the conversation, that picture with it, no other
    assert [p["multi_modal_data"] for p in prompts] == [{"image": [pictures["b"]]}] * 2
    assert "What is it?" in prompts[1]["prompt"] and "And now?" in prompts[1]["prompt"]


def test_image_flag_in_the_repl_goes_with_the_first_message(vision_llm, pictures, monkeypatch, capsys):
    prompts = use(vision_llm, monkeypatch)
    rc, _, err = run(monkeypatch, capsys, ["Hi", "Again"], "--image", str(pictures["a"]))
    assert rc == 0, err
    assert [p["multi_modal_data"] for p in prompts] == [{"image": [pictures["a"]]}] * 2
    assert prompts[0]["prompt"].index("<|image_pad|>") < prompts[0]["prompt"].index("Hi")


def test_a_bad_picture_is_one_line(vision_llm, tmp_path, monkeypatch, capsys):
    use(vision_llm, monkeypatch)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture at all")
    rc, _, err = run(monkeypatch, capsys, [], "--image", str(bad), "-m", "hi")
    assert_one_error_line(rc, err, "chat", "is not an image format Pillow can read")
    # in the REPL: said, and the next message goes without it
    prompts = use(vision_llm, monkeypatch)
    rc, _, err = run(monkeypatch, capsys, [f"/image {bad}", "hi", "hello"])
    assert rc == 0 and "error: " in err and "is not an image format Pillow can read" in err
    assert isinstance(prompts[-1], str) and "hello" in prompts[-1]


def test_a_text_model_refuses_pictures(text_llm, pictures, monkeypatch, capsys):
    prompts = use(text_llm, monkeypatch)
    rc, _, err = run(monkeypatch, capsys, [], "--image", str(pictures["a"]), "-m", "How many circles?")
    assert_one_error_line(rc, err, "chat", f"--image: {REFUSAL}")
    rc, _, err = run(monkeypatch, capsys, [], "--video", str(pictures["clip"]))
    assert_one_error_line(rc, err, "chat", f"--video: {REFUSAL}")
    assert prompts == []
    rc, _, err = run(monkeypatch, capsys, [f"/image {pictures['a']}", "hello"])
    assert rc == 0 and f"error: {REFUSAL}" in err
    assert prompts and isinstance(prompts[0], str)  # the message went without the picture


def test_a_missing_picture_fails_before_loading(monkeypatch, capsys):
    def no_model(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load_llm", no_model)
    rc, _, err = run(monkeypatch, capsys, [], "--image", "no-such.png", "-m", "hi")
    assert_one_error_line(rc, err, "chat", "--image no-such.png: no such file")


def test_serve_flags_reach_serve(tmp_path, monkeypatch, capsys):
    import qwen35.serve

    seen = {}
    monkeypatch.setattr(qwen35.serve, "serve", lambda model, **kwargs: seen.update(kwargs))
    assert cli.main(["serve", "--allowed-local-media-path", str(tmp_path), "--allow-remote-media",
                     "--media-fetch-timeout", "2.5", "--max-image-pixels", "1000000"]) == 0
    assert (seen["allowed_local_media_path"], seen["allow_remote_media"]) == (str(tmp_path), True)
    assert (seen["media_fetch_timeout_s"], seen["max_image_pixels"]) == (2.5, 1000000)
    assert cli.main(["serve"]) == 0
    assert (seen["allowed_local_media_path"], seen["allow_remote_media"], seen["max_image_pixels"]) == (
        None, False, None)
    rc = cli.main(["serve", "--max-image-pixels", "0"])
    assert_one_error_line(rc, capsys.readouterr().err, "serve", "--max-image-pixels must be a positive integer")


def test_serve_refuses_a_media_folder_that_is_not_one(tmp_path, capsys):
    rc = cli.main(["serve", "--allowed-local-media-path", str(tmp_path / "missing")])
    assert_one_error_line(rc, capsys.readouterr().err, "serve", "(--allowed-local-media-path)",
                          "missing is not a folder")
    rc = cli.main(["serve", "--media-fetch-timeout", "-1"])
    assert_one_error_line(rc, capsys.readouterr().err, "serve", "--media-fetch-timeout", "got -1")

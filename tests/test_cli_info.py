"""`qwen35 info`, run in-process through qwen35.cli.main."""

from __future__ import annotations

import copy
import json

import pytest

from qwen35.cli import build_parser, main
from qwen35.presets import PRESETS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qwen35 info: error: ")
    for f in fragments:
        assert f in lines[0]


# ----------------------------------------------------------------------------------------------------------------
# presets


def test_397b_text_report(capsys):
    rc, out, err = run(capsys, "info", "--preset", "397B-A17B")
    assert rc == 0 and err == ""
    for expected in (
        "397B-A17B", "60 layers = 15 full attention + 45 Gated DeltaNet",
        "396.346 B",  # text
        "396.802 B",  # text + vision, the "397B"
        "6.596 B",  # MTP
        "17.349 B", "16.332 B",  # active incl. / excl. embedding
        "793.60 GB",  # bf16 weights
        "30,720 B", "8.05 GB",  # KV per token and at 262,144 tokens
        "180.00 MiB", "3.16 MiB",  # DeltaNet state per sequence
    ):
        assert expected in out, expected
    assert "Fit in" not in out  # no --memory, no fit section


def test_397b_json(capsys):
    rc, out, err = run(capsys, "info", "--preset", "qwen3.5-397b-a17b", "--json")
    assert rc == 0 and err == ""
    r = json.loads(out)
    p = r["params"]
    assert p["text"] == pytest.approx(396.35e9, abs=0.01e9)
    assert round(p["text_and_vision"] / 1e9) == 397
    assert p["active_per_token"] == pytest.approx(17.35e9, abs=0.01e9)
    assert p["active_per_token_excl_embedding"] == pytest.approx(16.33e9, abs=0.01e9)
    assert r["kv_cache"]["bytes_per_token"] == 30_720
    assert r["kv_cache"]["bytes_at_context"] == 30_720 * 262_144
    assert r["deltanet_state"]["recurrent_bytes_per_sequence"] == 45 * 64 * 128 * 128 * 4
    assert r["weight_dtype"] == "bf16"
    assert set(r["weight_bytes"]) == {"bf16", "fp32", "fp8", "int8", "int4"}
    assert "fit" not in r


def test_397b_fit_in_text_and_json(capsys):
    rc, out, _ = run(capsys, "info", "--preset", "397B-A17B", "--memory", "640", "--dtype", "fp8")
    assert rc == 0
    assert "Fit in 640.00 GB (fp8 weights" in out
    assert "fits: one sequence up to 262,144 tokens" in out
    rc, out, _ = run(capsys, "info", "--preset", "397B-A17B", "--memory", "640", "--dtype", "fp8",
                     "--context", "32768", "--json")
    f = json.loads(out)["fit"]
    assert rc == 0 and f["fits"] and f["context"] == 32_768 and f["weight_dtype"] == "fp8"
    per_seq = f["state_bytes_per_sequence"] + 32_768 * 30_720
    assert f["max_sequences"] == (640 * 10**9 - f["weight_bytes"]) // per_seq


def test_does_not_fit_is_reported_not_an_error(capsys):
    rc, out, err = run(capsys, "info", "--preset", "397B-A17B", "--memory", "80")
    assert rc == 0 and err == ""
    assert "does not fit" in out


# ----------------------------------------------------------------------------------------------------------------
# checkpoint folders


def _write_config(folder, body) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(body), encoding="utf-8")


def test_checkpoint_folder(tmp_path, capsys):
    ckpt = tmp_path / "Qwen3.5-9B"
    _write_config(ckpt, PRESETS["9B"])
    rc, out, err = run(capsys, "info", str(ckpt), "--memory", "24", "--context", "32768")
    assert rc == 0 and err == ""
    assert str(ckpt) in out
    assert "8.954 B" in out and "32,768 B" in out and "48.00 MiB" in out
    assert "sequences of 32,768 tokens at once" in out
    # the config.json file itself works too, and gives the same numbers
    rc, out_json, _ = run(capsys, "info", str(ckpt / "config.json"), "--json")
    assert rc == 0
    assert json.loads(out_json)["params"]["text"] == pytest.approx(8.954e9, abs=0.001e9)


def test_fp8_checkpoint_defaults_to_fp8_weights(tmp_path, capsys):
    body = copy.deepcopy(PRESETS["35B-A3B"])
    body["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    _write_config(tmp_path / "fp8", body)
    rc, out, _ = run(capsys, "info", str(tmp_path / "fp8"), "--json", "--memory", "80")
    r = json.loads(out)
    assert rc == 0 and r["weight_dtype"] == "fp8" and r["model"]["quantization"] == "fp8"
    assert r["fit"]["weight_bytes"] == r["weight_bytes"]["fp8"]["loaded"]


def test_text_only_checkpoint_has_no_vision(tmp_path, capsys):
    text = dict(PRESETS["0.8B"]["text_config"], tie_word_embeddings=True)
    _write_config(tmp_path / "text", text)
    rc, out, _ = run(capsys, "info", str(tmp_path / "text"), "--json")
    p = json.loads(out)["params"]
    assert rc == 0 and p["vision"] == 0 and p["text_and_vision"] == p["text"]
    assert p["text"] == pytest.approx(0.752e9, abs=0.001e9)


# ----------------------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit 2


def test_bad_preset(capsys):
    assert_one_line_error(*run(capsys, "info", "--preset", "7B"), "unknown preset '7B'", "397B-A17B", "0.8B")


def test_qwen36_presets_are_named_as_such(capsys):
    rc, out, _ = run(capsys, "info", "--preset", "Qwen3.6-35B-A3B", "--json")
    rc35, out35, _ = run(capsys, "info", "--preset", "35B-A3B", "--json")
    assert rc == rc35 == 0
    report, report35 = json.loads(out), json.loads(out35)
    assert report["model"]["name"].startswith("Qwen3.6-35B-A3B")
    assert report35["model"]["name"].startswith("Qwen3.5-35B-A3B")
    report["model"].pop("name"), report35["model"].pop("name")
    assert report == report35  # same architecture, same shapes
    assert_one_line_error(*run(capsys, "info", "--preset", "qwen3.6-9b"), "no Qwen3.6-9B", "27B and 35B-A3B")


def test_a_closed_pipe_is_not_an_error(monkeypatch, capsys):
    import sys

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sys.__stdout__.fileno()

    import os
    saved = os.dup(sys.__stdout__.fileno())
    try:
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        assert main(["info", "--preset", "0.8B"]) == 0
    finally:
        os.dup2(saved, sys.__stdout__.fileno())
        os.close(saved)
    assert "error" not in capsys.readouterr().err


def test_bad_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert_one_line_error(*run(capsys, "info", str(missing)), str(missing), "no config.json")


def test_broken_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert_one_line_error(*run(capsys, "info", str(tmp_path)), "not valid JSON")
    _write_config(tmp_path, {"model_type": "llama"})
    assert_one_line_error(*run(capsys, "info", str(tmp_path)), "model_type")


@pytest.mark.parametrize("argv,fragment", [
    ((), "PATH or --preset"),
    (("somewhere", "--preset", "9B"), "not both"),
    (("--preset", "9B", "--memory", "0"), "--memory"),
    (("--preset", "9B", "--memory", "inf"), "--memory"),
    (("--preset", "9B", "--context", "300000"), "exceeds the model's maximum"),
])
def test_bad_arguments(capsys, argv, fragment):
    assert_one_line_error(*run(capsys, "info", *argv), fragment)


def test_argparse_errors_return_2_instead_of_exiting(capsys):
    rc = main(["info", "--preset", "9B", "--dtype", "fp4"])
    assert rc == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 2  # no subcommand: help on stderr


def test_help_explains_the_numbers(capsys):
    assert main(["info", "--help"]) == 0
    out = capsys.readouterr().out
    for term in ("active per token", "KV cache per token", "DeltaNet state", "--memory", "fp8", "--context"):
        assert term in out


def test_parser_is_ready_for_more_subcommands():
    parser = build_parser()
    args = parser.parse_args(["info", "--preset", "27B"])
    assert args.command == "info" and callable(args.func)


def test_prefix_cache_snapshot_accounting(capsys):
    # one snapshot = one sequence's DeltaNet state, expressed as the KV of that many tokens (it lives in the KV pool)
    rc, out, _ = run(capsys, "info", "--preset", "0.8B", "--json")
    r = json.loads(out)
    pc, state, kv = r["prefix_cache"], r["deltanet_state"]["bytes_per_sequence"], r["kv_cache"]["bytes_per_token"]
    assert rc == 0 and pc["snapshot_bytes"] == state and pc["snapshot_kv_tokens"] == -(-state // kv) == 1590
    rc, out, _ = run(capsys, "info", "--preset", "0.8B")
    assert "Prefix cache snapshots" in out and "18.63 MiB  = the KV of 1,590 tokens" in out

"""The training loop: a tiny MoE model learns (held-out loss falls), resuming is bit-identical, the exported
checkpoint folder and the command line (the batching, schedule and initialisation have their own files)."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from qwen35.train.loop import Trainer
from qwen35.train.batches import Dataset, prepare_data
from qwen35.train.config import TrainConfig
from qwen35.train.presets import build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*longer than seq_len")

# short tasks only: the test is about the loop, not the data
MIX = {"add2": 1.0, "count": 1.0, "reverse": 0.5, "text": 0.5}


def _cfg(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(model="tiny", steps=8, batch_size=8, seq_len=192, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                eval_every=50, eval_batches=2, save_every=0, out_dir=str(tmp_path / name), n_train=1200,
                n_held_out=24, vocab_size=384, tokenizer_examples=400, data_mix=MIX, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Dataset:
    return prepare_data(_cfg(tmp_path_factory.mktemp("d"), "data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """~100 steps of the tiny model; shared by the tests that look at a finished run."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = _cfg(tmp, "run", steps=100, eval_every=50, eval_batches=3)
    trainer = Trainer(cfg, data=data)
    before = trainer.evaluate()
    result = trainer.run()
    return cfg, before, result


def test_training_lowers_held_out_loss(trained) -> None:
    cfg, before, result = trained
    after = result.evals[-1]
    print("held-out before", before, "after", after)
    assert len(result.history) == cfg.steps and result.evals[-1]["step"] == cfg.steps
    assert math.log(384) - 0.3 < before["loss"] < math.log(384) + 0.3  # a fresh model is near uniform
    assert after["loss"] < before["loss"] - 1.5, (before, after)
    assert after["mtp_loss"] < before["mtp_loss"] - 1.0
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in result.history)
    assert result.tokens_per_second > 0


def test_exported_folder(trained) -> None:
    from safetensors.torch import load_file

    import qwen35
    from qwen35.chat import Tokenizer

    cfg, _, result = trained
    folder = result.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", "training_info.json"):
        assert (folder / name).exists(), name
    assert (result.out_dir / "loss_curve.png").stat().st_size > 1000
    assert json.loads((result.out_dir / "history.json").read_text())["train"][-1]["step"] == cfg.steps
    # per-expert, official layout
    assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in load_file(str(folder / "model.safetensors"))
    model = qwen35.load_model(folder, dtype="float32")
    assert result.head is result.model.mtp and model.mtp.hidden_source == cfg.hidden_source
    assert model.extra_tensors == {}
    assert set(model.state_dict()) == set(result.model.state_dict())
    for k, v in result.model.state_dict().items():  # the MTP head included: it is model.mtp
        assert torch.equal(v, model.state_dict()[k]), k
    tok = Tokenizer(folder)
    assert len(tok) == model.text_config.vocab_size
    assert tok.im_end_id in tok.stop_token_ids and tok.chat_template is not None
    assert model.text_config.eos_token_id == tok.endoftext_id


def test_resume_is_bit_identical(tmp_path, data) -> None:
    kw = dict(steps=6, grad_accum=2, warmup_steps=2, eval_every=3, save_every=0)
    straight = Trainer(_cfg(tmp_path, "straight", **kw), data=data).run()

    first = Trainer(_cfg(tmp_path, "halves", **kw), data=data)
    first.run(stop_at=3, final=False)
    # anything the process does in between must not matter: the state carries the RNGs
    torch.manual_seed(12345)
    random.seed(12345)
    torch.randn(100)
    second = Trainer(_cfg(tmp_path, "halves", **kw), resume=True, data=data)
    assert second.step == 3
    resumed = second.run()

    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]  # exact equality
    assert [h["mtp_loss"] for h in resumed.history] == [h["mtp_loss"] for h in straight.history]
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in straight.evals]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in straight.head.state_dict().items():
        assert torch.equal(v, resumed.head.state_dict()[k]), k


def test_resume_refuses_changed_or_missing_state(tmp_path, data) -> None:
    cfg = _cfg(tmp_path, "r", steps=2, warmup_steps=1)
    Trainer(cfg, data=data).run(final=False)
    with pytest.raises(FileExistsError):
        Trainer(cfg, data=data)  # a fresh run would overwrite the saved one
    changed = copy.deepcopy(cfg)
    changed.lr = 1e-3
    with pytest.raises(ValueError, match="lr"):
        Trainer(changed, resume=True, data=data)
    longer = copy.deepcopy(cfg)
    longer.steps = 3  # resume-safe: continue with a longer schedule
    assert Trainer(longer, resume=True, data=data).step == 2
    with pytest.raises(FileNotFoundError):
        Trainer(_cfg(tmp_path, "nothing"), resume=True, data=data)


def test_cli_help_and_config(tmp_path, capsys) -> None:
    from qwen35.train.cli import build_parser, config_from_args, train_main

    assert train_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--resume" in text and "--preset" in text and "loss_curve.png" in text
    assert train_main([]) == 2  # --out is required
    args = build_parser().parse_args(["--preset", "embedded", "--steps", "300", "--out", str(tmp_path / "e"),
                                      "--lr", "1e-3", "--no-progress"])
    cfg = config_from_args(args)
    assert cfg.model == "embedded" and cfg.steps == 300 and cfg.lr == 1e-3 and not cfg.progress
    assert cfg.warmup_steps == 15  # the recipe's warmup scales with the step count
    args = build_parser().parse_args(["--out", str(tmp_path / "t"), "--steps", "0"])
    with pytest.raises(ValueError):
        config_from_args(args)


def test_cli_runs_a_tiny_training(tmp_path, capsys) -> None:
    from qwen35.train.cli import train_main

    out = tmp_path / "cli"
    argv = ["--preset", "tiny", "--steps", "2", "--out", str(out), "--batch-size", "2", "--seq-len", "160",
            "--n-train", "60", "--n-held-out", "8", "--vocab-size", "320", "--no-progress", "--warmup", "1"]
    assert train_main(argv) == 0
    assert (out / "model" / "model.safetensors").exists()
    assert "held-out loss" in capsys.readouterr().out
    assert train_main(argv) == 2  # the state exists: refuses to overwrite without --resume
    assert train_main(argv + ["--resume"]) == 0  # nothing left to do, but a valid resume


# ----------------------------------------------------------------------------------------------------------------
# the embedded model's config and its evaluation


def test_embedded_config_fits_the_budget() -> None:
    from qwen35.model.mtp import MTPHead
    from qwen35.train.embedded import EMBEDDED_MODEL

    model = build_model(EMBEDDED_MODEL, 2048)
    cfg = model.text_config
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.is_moe and cfg.num_experts_per_tok < cfg.num_experts and cfg.shared_expert_intermediate_size > 0
    assert cfg.mtp_num_hidden_layers == 1 and model.config.model_type == "qwen3_5_moe_text"
    head = MTPHead(cfg)
    n = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters())
    assert n * 4 < 30e6  # the float32 checkpoint, MTP included, stays under 30 MB


def test_check_tool_calls() -> None:
    from qwen35.chat import parse_tool_calls
    from qwen35.train.data import CALCULATOR_TOOL, LOOKUP_TOOL
    from qwen35.train.embedded import check_tool_calls

    tools = [CALCULATOR_TOOL, LOOKUP_TOOL]

    def calls(text):
        return parse_tool_calls(text, tools)[1]

    good = ("<tool_call>\n<function=lookup>\n<parameter=topic>\ncapital\n</parameter>\n"
            "<parameter=name>\nPeru\n</parameter>\n</function>\n</tool_call>")
    assert check_tool_calls(calls(good), tools)
    assert not check_tool_calls(calls("The answer is 4."), tools)  # no call at all
    assert not check_tool_calls(calls(good.replace("capital", "weather")), tools)  # outside the enum
    missing = "<tool_call>\n<function=lookup>\n<parameter=topic>\ncapital\n</parameter>\n</function>\n</tool_call>"
    assert not check_tool_calls(calls(missing), tools)  # a required parameter is missing
    extra = good.replace("</function>", "<parameter=mood>\nhappy\n</parameter>\n</function>")
    assert not check_tool_calls(calls(extra), tools)


def test_greedy_generate_batched_equals_solo(trained) -> None:
    from qwen35.train.embedded import greedy_generate

    _, _, result = trained
    tok = result.data.tokenizer
    prompts = [tok.encode(t).ids for t in ("<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n<|im_start|>assistant\n",
                                           "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                           "The small dog")]
    stop = [tok.token_to_id("<|im_end|>")]
    pad = tok.token_to_id("<|endoftext|>")
    model = result.model.eval()
    with torch.no_grad():
        batched = greedy_generate(model, prompts, stop, pad, max_new_tokens=12, batch_size=3)
        solo = [greedy_generate(model, [p], stop, pad, max_new_tokens=12)[0] for p in prompts]
    assert batched == solo
    assert all(0 < len(g) <= 12 for g in batched)


def test_evaluate_report(trained) -> None:
    from qwen35.train.embedded import evaluate

    _, _, result = trained
    report = evaluate(result.model_dir, per_task=2, tasks=["add2", "lookup"], max_new_tokens=16, mtp_examples=4)
    assert set(report["exact_match"]) == {"add2", "lookup"}
    assert set(report["tool_calls"]["well_formed"]) == {"lookup"}
    for key in ("vs_truth", "vs_main", "vs_truth_assistant", "vs_main_assistant"):
        assert 0.0 <= report["mtp"][key] <= 1.0
    assert report["mtp"]["assistant_positions"] > 0
    json.dumps(report)  # the report is written as JSON


def test_device_is_validated_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a torch device"):
        TrainConfig(device="gpu0").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            TrainConfig(device="cuda").validate()
    TrainConfig(device="cpu").validate()


"""RLConfig's thread settings and their flags: the trainer may run with its own thread count."""

from __future__ import annotations

import argparse

import pytest

from qwen35.rl.cli import add_rl_arguments, config_from_args
from qwen35.rl.config import RLConfig


def test_trainer_threads_default_to_threads_and_are_checked() -> None:
    assert RLConfig().trainer_threads is None
    RLConfig(threads=1, trainer_threads=2).validate()
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="trainer_threads"):
            RLConfig(trainer_threads=bad).validate()
    assert "trainer_threads" in RLConfig.RESUME_SAFE  # how fast a run goes never changes what it computes


def test_trainer_threads_flag(tmp_path) -> None:
    p = argparse.ArgumentParser()
    add_rl_arguments(p)
    cfg = config_from_args(p.parse_args(["--out", str(tmp_path), "--threads", "1", "--trainer-threads", "2"]))
    assert (cfg.threads, cfg.trainer_threads) == (1, 2)
    cfg = config_from_args(p.parse_args(["--out", str(tmp_path)]))
    assert cfg.trainer_threads is None

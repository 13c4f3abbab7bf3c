"""Loading converts tensor by tensor: peak RSS stays near the size of the weights in the target dtype."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM

CFG = dict(model_type="qwen3_5_text", vocab_size=48000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=128, intermediate_size=4096, linear_num_key_heads=4,
           linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64, tie_word_embeddings=False)

# The baseline is taken after torch's one-time lazy initialisation (~65 MiB on the first module built, whatever
# its size), so that the check measures what scales with the weights.
PROBE = r"""
import sys, torch, qwen35, qwen35.checkpoint
from qwen35.config import config_from_dict
from qwen35.model import Qwen35ForCausalLM
with torch.device("meta"):
    Qwen35ForCausalLM(config_from_dict(dict(%r, vocab_size=8, num_hidden_layers=4)))
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss('VmRSS:')
m = qwen35.load_model(sys.argv[1], dtype=sys.argv[2])
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(rss('VmHWM:') - base, weights)
""" % (CFG,)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    model = Qwen35ForCausalLM(config_from_dict(CFG)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_bytes=150 * 1024 ** 2)
    del model
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_rss_while_loading(bf16_checkpoint, dtype):
    out = subprocess.run([sys.executable, "-c", PROBE, str(bf16_checkpoint), dtype], capture_output=True,
                         text=True, check=True)
    peak, weights = map(int, out.stdout.split())
    assert weights > 300e6 if dtype == "float32" else weights > 150e6
    assert peak <= 1.3 * weights, f"peak {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"

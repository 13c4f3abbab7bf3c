"""Loading converts tensor by tensor: peak RSS stays near the size of the weights in the target dtype."""

from __future__ import annotations

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


# FP8 kept as FP8: the loaded weights (FP8 bytes, float32 scales, the bf16 rest: buffers and parameters) are the
# checkpoint's bytes, and loading peaks near them.  "fp8-from-bf16" quantizes the bf16 folder while reading it:
# the bf16 model is never built, so the peak is bounded by the FP8 weights, not the bf16 ones.
QUANT_PROBE = PROBE.replace("m = qwen35.load_model(sys.argv[1], dtype=sys.argv[2])",
                            "m = qwen35.load_model(sys.argv[1], quantization=sys.argv[2])").replace(
    "weights = sum(p.numel() * p.element_size() for p in m.parameters())",
    "weights = sum(p.numel() * p.element_size() for p in list(m.parameters()) + list(m.buffers()))")


@pytest.fixture(scope="module")
def fp8_checkpoint(bf16_checkpoint, tmp_path_factory):
    import qwen35

    path = tmp_path_factory.mktemp("big_fp8")
    qwen35.load_model(bf16_checkpoint, quantization="fp8").save_pretrained(path, max_shard_bytes=150 * 1024 ** 2)
    return path


@pytest.fixture(scope="module")
def int4_checkpoint(bf16_checkpoint, tmp_path_factory):
    import qwen35

    path = tmp_path_factory.mktemp("big_int4")
    qwen35.load_model(bf16_checkpoint, quantization="int4").save_pretrained(path, max_shard_bytes=150 * 1024 ** 2)
    return path


# int4 likewise ("int4-from-bf16": 4-bit layers and the int8 lm_head quantized from the bf16 folder as it is read).
# In memory the int8 lm_head also keeps a bf16 copy of its scales (2 B per row) that the folder does not store,
# and the folder's weight_shape tensors (two int64 per 4-bit weight) become attributes.
@pytest.mark.parametrize("source", ["fp8", "fp8-from-bf16", "int4", "int4-from-bf16"])
def test_peak_rss_while_loading_fp8(bf16_checkpoint, fp8_checkpoint, int4_checkpoint, source):
    from safetensors import safe_open

    fmt = source.split("-")[0]
    quantized = fp8_checkpoint if fmt == "fp8" else int4_checkpoint
    folder = bf16_checkpoint if source.endswith("-from-bf16") else quantized
    out = subprocess.run([sys.executable, "-c", QUANT_PROBE, str(folder), fmt if folder == bf16_checkpoint else "auto"],
                         capture_output=True, text=True, check=True)
    peak, weights = map(int, out.stdout.split())
    on_disk = 0
    for f in quantized.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            on_disk += sum(h.get_tensor(k).nbytes for k in h.keys() if not k.endswith(".weight_shape"))
    rotary = 2 * 1024  # the rotary tables are buffers too (computed, not stored): a few KiB
    scale_copy = 2 * CFG["vocab_size"] if fmt == "int4" else 0
    assert on_disk <= weights <= on_disk + rotary + scale_copy
    bf16_bytes = sum(f.stat().st_size for f in bf16_checkpoint.glob("*.safetensors"))
    print(f"{source}: peak {peak / 1e6:.0f} MB, weights {weights / 1e6:.0f} MB (bf16 folder {bf16_bytes / 1e6:.0f} MB)")
    # the embedding (kept bf16) is most of this small shape; fp8 also keeps the lm_head bf16, int4 stores it int8
    assert weights < (0.85 if fmt == "fp8" else 0.6) * bf16_bytes
    assert peak <= 1.3 * weights, f"peak {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of {fmt}-checkpoint weights"

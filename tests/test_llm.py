"""The Python API: LLM.generate / stream and AsyncLLM, with a real tokenizer path (byte-level, multi-byte text)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

import qwen35
from qwen35.engine import AsyncLLM, SamplingParams
from tests.chat.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("tiny"))
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) + 7
    # a vocabulary that matches the byte tokenizer (256 bytes + 7 added tokens)
    from qwen35.config import config_from_dict
    from tests.engine.conftest import BASE
    cfg = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, vocab_size=vocab,
                                eos_token_id=vocab - 5))
    torch.manual_seed(0)
    m = qwen35.model.Qwen35ForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        # favour bytes >= 0x80 so that generated text is full of multi-byte UTF-8 sequences split over tokens
        m.lm_head.weight[128:256] += 0.3
    m.save_pretrained(folder)
    return qwen35.LLM(folder, dtype="float32")


def test_stream_deltas_concatenate_to_final_text(llm):
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=40, ignore_eos=True)
    deltas, last = [], None
    for out in llm.stream("héllo 世界", params):
        d = out.outputs[0].delta_text
        d.encode("utf-8")  # always whole characters
        deltas.append(d)
        last = out
    final = llm.generate("héllo 世界", params)[0].outputs[0]
    assert "".join(deltas) == final.text == last.outputs[0].text
    assert final.token_ids == last.outputs[0].token_ids
    assert final.text == llm.tokenizer.decode(final.token_ids)
    assert any(ord(c) > 127 for c in final.text)


def test_generate_batch_order_and_logprobs(llm):
    prompts = ["a", "bb", [65, 66, 67]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs][2] == [65, 66, 67]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5 and all(len(t) == 3 for t in c.top_logprobs)
        assert all(t[0][0] == tok for t, tok in zip(c.top_logprobs, c.token_ids))  # greedy = top-1


def test_stop_string_split_across_tokens(llm):
    ref = llm.generate("xyz", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].text
    stop = ref[5:8]
    assert len(stop) == 3 and "\ufffd" not in stop  # deterministic greedy text; the window is clean
    out = llm.generate("xyz", SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.text == ref[:ref.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop


def test_async_concurrent_streams_and_abort(llm):
    engine = AsyncLLM(llm.engine)

    async def collect(prompt, n):
        text = ""
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)):
            text += out.outputs[0].delta_text
        return text

    async def disconnect_early():
        agen = engine.generate("zz", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()

    async def main():
        texts = await asyncio.gather(*[collect(p, 8) for p in ["a", "b", "c", "d"]], disconnect_early())
        with pytest.raises(ValueError, match="empty"):
            async for _ in engine.generate([], SamplingParams()):
                pass
        for _ in range(100):
            if engine.stats()["running"] == 0 and engine.stats()["blocks_used"] == 0:
                break
            await asyncio.sleep(0.02)
        return texts

    try:
        texts = asyncio.run(main())
    finally:
        engine.shutdown()
    want = [llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].text
            for p in ["a", "b", "c", "d"]]
    assert texts[:4] == want
    assert llm.engine.cache.usage()["blocks_used"] == 0 and llm.engine.cache.usage()["slots_used"] == 0

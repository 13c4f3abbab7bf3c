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


# ---------------------------------------------------------------------------------------------------------------
# defaults, tokenizer options, saving, dtypes


def _folder_with_generation_config(llm, tmp_path, config: dict):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(llm.model_path, folder)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_default_sampling_comes_from_generation_config(llm, tmp_path):
    folder = _folder_with_generation_config(llm, tmp_path, {"do_sample": False, "top_k": 20})
    greedy = qwen35.LLM(folder, dtype="float32")
    params = greedy.get_default_sampling_params()
    assert params.temperature == 0.0 and params.top_k == 20 and params.max_tokens is None
    folder2 = _folder_with_generation_config(llm, tmp_path / "b", {"temperature": 0.6, "top_p": 0.95})
    sampled = qwen35.LLM(folder2, dtype="float32").get_default_sampling_params()
    assert (sampled.temperature, sampled.top_p, sampled.max_tokens) == (0.6, 0.95, None)
    # a call without params uses them: greedy here, so it equals an explicit greedy call
    explicit = greedy.generate("abc", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    implicit = greedy.generate("abc")[0]
    assert implicit.outputs[0].token_ids[:8] == explicit.outputs[0].token_ids


def test_chat_without_params_runs_to_the_end_of_the_turn():
    llm = qwen35.LLM()  # the embedded model: greedy by its generation_config, the turn ends with <|im_end|>
    result = llm.chat([{"role": "user", "content": "What is 47 + 38?"}])
    assert result.finish_reason == "stop" and result.content == "The answer is 85."
    assert "47 + 38" in result.reasoning


def test_cli_and_server_take_the_same_defaults(llm, tmp_path):
    from qwen35.cli import _add_sampling_args, _sampling_params
    from qwen35.serve.protocol import ChatCompletionRequest, sampling_params
    from qwen35.engine.params import sampling_defaults
    import argparse

    config = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.05}
    folder = _folder_with_generation_config(llm, tmp_path, config)
    tok = qwen35.LLM(folder, dtype="float32").tokenizer
    parser = argparse.ArgumentParser()
    _add_sampling_args(parser, None)
    cli = _sampling_params(parser.parse_args([]), tok)
    server = sampling_params(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]),
                             sampling_defaults(tok.generation_config), 100)
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        assert getattr(cli, name) == getattr(server, name), name
    assert cli.temperature == 0.6 and cli.max_tokens is None
    assert _sampling_params(parser.parse_args(["--temperature", "0"]), tok).temperature == 0


def test_token_ids_only_without_a_tokenizer(llm, tmp_path):
    import shutil
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(llm.model_path / name, folder / name)
    with pytest.raises(ValueError, match="tokenizer.json.*tokenizer=PATH.*skip_tokenizer_init=True"):
        qwen35.LLM(folder, dtype="float32")
    bare = qwen35.LLM(folder, dtype="float32", skip_tokenizer_init=True)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = bare.generate([[65, 66, 67]], params)[0].outputs[0]
    assert out.token_ids == llm.generate([[65, 66, 67]], params)[0].outputs[0].token_ids and out.text == ""
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare.generate("text")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare.chat([{"role": "user", "content": "hi"}])
    # or the tokenizer from another folder
    borrowed = qwen35.LLM(folder, dtype="float32", tokenizer=llm.model_path)
    assert borrowed.generate("abc", params)[0].outputs[0].text == llm.generate("abc", params)[0].outputs[0].text


def test_save_pretrained_writes_a_folder_that_loads_again(llm, tmp_path):
    llm.save_pretrained(tmp_path / "out")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file(), name
    again = qwen35.LLM(tmp_path / "out", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert again.generate("héllo", params)[0].outputs[0].text == llm.generate("héllo", params)[0].outputs[0].text
    # the model's own save_pretrained copies the tokenizer from the folder it was loaded from
    again.model.save_pretrained(tmp_path / "out2")
    assert (tmp_path / "out2" / "tokenizer.json").read_bytes() == (tmp_path / "out" / "tokenizer.json").read_bytes()


def test_float16_engine_follows_the_full_forward(llm):
    half = qwen35.LLM(llm.model_path, dtype="float16")
    prompt = half.tokenizer.encode("héllo 世界")
    out = half.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True))[0]
    ids = torch.tensor([prompt + out.outputs[0].token_ids])
    with torch.no_grad():
        logits = half.model(ids).logits[0, len(prompt) - 1:-1].float()
    full = torch.log_softmax(logits, -1)
    chosen = torch.tensor(out.outputs[0].token_ids)
    assert torch.isfinite(full).all()
    got = torch.tensor(out.outputs[0].logprobs)
    assert torch.allclose(got, full[torch.arange(len(chosen)), chosen], atol=3e-2)
    # greedy: every chosen token is the full forward's top token, up to fp16 near-ties
    top = full.max(-1).values
    assert (top - full[torch.arange(len(chosen)), chosen] < 3e-2).all()


def test_no_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    import qwen35.llm as llm_module
    monkeypatch.setattr(llm_module, "EMBEDDED_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(ValueError, match="no embedded model.*pass a checkpoint folder"):
        qwen35.LLM()

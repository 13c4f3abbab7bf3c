"""Images and videos through the engine: greedy output equal to transformers' ``generate`` on the same inputs
(float32, random weights), and equal to itself under every engine path -- chunk boundaries inside a picture,
batched with other requests, n > 1, preemption, prefix-cache hits keyed by the picture's content."""

from __future__ import annotations

import warnings

import pytest
import torch

import qwen35
from qwen35.engine import EngineConfig, LLMEngine, SamplingParams, VisionInput
from tests.hf_oracle import save_hf
from tests.model.test_vision import IMAGE, VIDEO, Prompt, _oracle

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref = _oracle(request.param == "moe")
    path = save_hf(ref, tmp_path_factory.mktemp(request.param))
    return ref, qwen35.load_model(path, dtype="float32")


def engine(model, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    return LLMEngine(model, None, EngineConfig(**kw))


def vision_of(p: Prompt) -> VisionInput:
    return VisionInput(**p.vision)


def run(eng: LLMEngine, requests, n_tokens: int, **params) -> list:
    """Add every (ids, vision) request at once, step to the end; outputs in request order."""
    rids = [eng.add_request(ids, SamplingParams(max_tokens=n_tokens, **{**GREEDY, **params}), vision=v)
            for ids, v in requests]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return [done[r] for r in rids]


def hf_generate(ref, p: Prompt, n: int) -> list[int]:
    mm = (p.ids == IMAGE).long() + 2 * (p.ids == VIDEO).long()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = ref.generate(input_ids=p.ids, attention_mask=torch.ones_like(p.ids), mm_token_type_ids=mm,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, **p.vision)
    return out[0, p.ids.shape[1]:].tolist()


PROMPTS = {
    "two-images-and-a-video": dict(seed=0),
    "one-image": dict(seed=1, images=((1, 4, 4),), video=None),
    "video-only": dict(seed=2, images=(), video=(3, 2, 4)),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_equals_transformers_generate(pair, name):
    ref, ours = pair
    p = Prompt(**PROMPTS[name])
    want = hf_generate(ref, p, 8)
    got = run(engine(ours), [(p.ids[0].tolist(), vision_of(p))], 8)[0]
    assert got.outputs[0].token_ids == want, name


def test_every_engine_path_gives_the_same_tokens(pair):
    _, ours = pair
    p = Prompt(4)
    ids, v = p.ids[0].tolist(), vision_of(p)
    solo = run(engine(ours, enable_prefix_caching=False), [(ids, v)], 8)[0].outputs[0].token_ids
    first_pad = ids.index(IMAGE)
    # chunks of 5 tokens: boundaries fall inside both images and the video's frames
    chunked = run(engine(ours, max_num_batched_tokens=5, enable_prefix_caching=False), [(ids, v)], 8)[0]
    assert chunked.outputs[0].token_ids == solo
    # batched with a text request and another picture prompt
    other = Prompt(5, images=((1, 2, 2),), video=None)
    outs = run(engine(ours, max_num_batched_tokens=16), [(ids, v), (list(range(3, 20)), None),
                                                          (other.ids[0].tolist(), vision_of(other))], 8)
    assert outs[0].outputs[0].token_ids == solo
    assert outs[2].outputs[0].token_ids == run(engine(ours), [(other.ids[0].tolist(), vision_of(other))],
                                               8)[0].outputs[0].token_ids
    # n = 2 greedy samples share the prompt's pictures
    two = run(engine(ours), [(ids, v)], 8, n=2)[0]
    assert [c.token_ids for c in two.outputs] == [solo, solo]
    # a cache so small that the second sequence is preempted and recomputed, pictures included
    tight = engine(ours, block_size=4, cache_memory=_bytes_for(ours, 2 * -(-(len(ids) + 1) // 4) + 1),
                   max_num_seqs=2, enable_prefix_caching=False)
    preempted = []
    preempt = tight.scheduler._preempt
    tight.scheduler._preempt = lambda seq, batch: (preempted.append(seq.seq_id), preempt(seq, batch))
    outs = run(tight, [(ids, v), (ids, v)], 8)
    assert [o.outputs[0].token_ids for o in outs] == [solo, solo]
    assert preempted, "the cache was meant to be too small for both"
    assert first_pad > 0


def _bytes_for(model, blocks: int) -> int:
    from tests.engine.test_engine import cache_bytes

    return cache_bytes(model, blocks, block_size=4, seqs=2)


def test_prefix_cache_is_keyed_by_picture_content(pair):
    _, ours = pair
    p = Prompt(6, images=((1, 4, 4),), video=None)
    ids, v = p.ids[0].tolist(), vision_of(p)
    longer = ids + [7, 8, 9, 10, 11]  # the next turn: the same picture, more text after it
    eng = engine(ours)
    cold = run(eng, [(ids, v)], 6)[0]
    assert cold.num_cached_tokens == 0
    hit = run(eng, [(longer, v)], 6)[0]
    assert hit.num_cached_tokens == len(ids)  # resumed at the end of the first prompt, past the picture
    miss = run(engine(ours, enable_prefix_caching=False), [(longer, v)], 6)[0]
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    # the same token ids with another picture: nothing from the picture on may come from the cache
    changed = VisionInput(pixel_values=v.pixel_values.flip(0), image_grid_thw=v.image_grid_thw)
    other = run(eng, [(longer, changed)], 6)[0]
    assert other.num_cached_tokens <= ids.index(IMAGE)
    fresh = run(engine(ours, enable_prefix_caching=False), [(longer, changed)], 6)[0]
    assert other.outputs[0].token_ids == fresh.outputs[0].token_ids
    # the picture matters (else this test could not fail): the two pictures give different logits
    assert run(engine(ours), [(longer, changed)], 1, logprobs=0)[0].outputs[0].logprobs != \
        run(engine(ours), [(longer, v)], 1, logprobs=0)[0].outputs[0].logprobs


def test_bad_vision_requests_are_refused_by_name(pair, tmp_path):
    _, ours = pair
    p = Prompt(7, images=((1, 4, 4),), video=None)
    ids, v = p.ids[0].tolist(), vision_of(p)
    eng = engine(ours)
    with pytest.raises(ValueError, match="pad tokens"):
        eng.add_request([t for t in ids if t != IMAGE] + [IMAGE], SamplingParams(max_tokens=2), vision=v)
    with pytest.raises(ValueError, match="image_grid_thw"):
        eng.add_request(ids, SamplingParams(max_tokens=2), vision=VisionInput(pixel_values=v.pixel_values))
    with pytest.raises(ValueError, match="patches"):
        eng.add_request(ids, SamplingParams(max_tokens=2),
                        vision=VisionInput(pixel_values=v.pixel_values[:-1], image_grid_thw=v.image_grid_thw))
    assert not eng.has_unfinished()


def test_a_model_without_a_tower_refuses_pictures(model):
    eng = engine(model)
    with pytest.raises(ValueError, match="no vision tower"):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=2),
                        vision=VisionInput(pixel_values=torch.zeros(4, 8), image_grid_thw=torch.tensor([[1, 2, 2]])))


@pytest.mark.parametrize("method", ["mtp", "ngram"])
def test_speculative_decoding_after_pictures_is_token_identical(pair, method):
    # drafts after a picture prompt: the verify rows and the MTP layer run at the M-RoPE-shifted positions
    from qwen35.config import config_from_dict
    from qwen35.engine.speculative import SpeculativeConfig
    from qwen35.model import Qwen35ForCausalLM

    _, ours = pair
    d = ours.config.to_dict()
    d["text_config"]["mtp_num_hidden_layers"] = 1
    model = Qwen35ForCausalLM(config_from_dict(d), mtp=True, vision=True)
    missing = model.load_state_dict(ours.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("mtp.") for k in missing)
    with torch.no_grad():
        for name, p in model.mtp.named_parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else None
    model.eval()
    p = Prompt(8, images=((1, 4, 4),), video=(2, 2, 2))
    ids, v = p.ids[0].tolist(), vision_of(p)
    plain = run(engine(model), [(ids, v)], 12)[0].outputs[0].token_ids
    spec = engine(model, speculative_config=SpeculativeConfig(method=method, num_speculative_tokens=2,
                                                                warmup=10 ** 6))
    got = run(spec, [(ids, v), (ids, v)], 12)
    assert [o.outputs[0].token_ids for o in got] == [plain, plain]
    assert spec.drafter.stats.proposed > 0

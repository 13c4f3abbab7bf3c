"""Grammar-constrained decoding in the engine: the matcher against llguidance itself, masks in mixed batches, n > 1,
preemption, the padded vocabulary, finishing when the grammar is complete, and a missing library.

The model is random (a 4-layer float32 model over a byte-level tokenizer, lm_head padded past the vocabulary), so
whatever it writes is noise: that the output still parses and validates is the grammar's doing.
"""

from __future__ import annotations

import builtins
import json
import time

import pytest
import torch

from qwen35.config import config_from_dict
from qwen35.engine.llm_engine import EngineConfig, LLMEngine
from qwen35.engine.params import SamplingParams, StructuredSpec
from qwen35.engine.sampler import Sampler
from qwen35.model import Qwen35ForCausalLM
from tests.chat.tiny_tokenizer import TINY_IDS, write_tiny_tokenizer
from tests.engine.conftest import BASE

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

TOKENIZER_VOCAB = 256 + len(TINY_IDS)  # 263
MODEL_VOCAB = 300  # lm_head rows past the tokenizer: padding that must never be sampled
EOS = TINY_IDS["<|im_end|>"]

# Every value bounded, so a random model finishes well inside max_tokens.
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", None]},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
}, "required": ["name", "age", "pet", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from qwen35.chat import Tokenizer

    return Tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("structured_tok")))


@pytest.fixture(scope="module")
def model():
    cfg = config_from_dict(dict(BASE, model_type="qwen3_5_text", intermediate_size=96, vocab_size=MODEL_VOCAB,
                                eos_token_id=EOS))
    torch.manual_seed(0)
    m = Qwen35ForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
        m.lm_head.weight.mul_(6)
        # the padding rows get the largest logits: unmasked, they would be picked all the time
        m.lm_head.weight[TOKENIZER_VOCAB:] = m.lm_head.weight[:TOKENIZER_VOCAB].abs().max() * 3
    return m.eval()


def make_engine(model, tokenizer, **config) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(**{"max_num_seqs": 16, "max_num_batched_tokens": 256,
                                                       **config}))


def run(engine: LLMEngine, prompts, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def test_spec_shapes_are_checked():
    assert StructuredSpec.json({"type": "object"}).value == '{"type":"object"}'
    assert StructuredSpec.json('{"type": "object"}') == StructuredSpec.json({"type": "object"})
    # property order is kept: it is the order the output writes them in
    assert StructuredSpec.json({"properties": {"b": {}, "a": {}}}).value == '{"properties":{"b":{},"a":{}}}'
    sp = SamplingParams(structured={"kind": "regex", "value": "[0-9]+", "after": "</think>"})
    assert sp.structured == StructuredSpec("regex", "[0-9]+", after="</think>")
    for bad, words in [
        (dict(kind="xml"), "structured.kind"),
        (dict(kind="json_schema", value="{not json"), "structured.value"),
        (dict(kind="json_schema", value=[1]), "structured.value"),
        (dict(kind="json_schema", value={"x": float("nan")}), "JSON data"),
        (dict(kind="lark", value=""), "structured.value"),
        (dict(kind="regex", value="a", after=""), "structured.after"),
        (dict(kind="regex", value="a", strict="yes"), "structured.strict"),
        (dict(kind="regex", value="a", after="</think>", after_excludes="<tool_call>"), "after_excludes"),
        (dict(kind="regex", value="a", after_excludes=["<tool_call>"]), "needs structured.after"),
    ]:
        with pytest.raises(ValueError, match=words):
            StructuredSpec(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(structured={"kind": "regex", "value": "a", "regex": "b"})
    with pytest.raises(ValueError, match="structured must be"):
        SamplingParams(structured="json")


def test_masks_are_llguidance_masks(model, tokenizer):
    """Step by step along a random path, the engine's allowed set equals a bare llguidance matcher's."""
    engine = make_engine(model, tokenizer)
    compiler = engine.structured
    spec = StructuredSpec.json(PERSON)
    ours = compiler.matcher(spec)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults={
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True})
    bare = llguidance.LLMatcher(compiler._tok, grammar, log_level=0)
    g = torch.Generator().manual_seed(0)
    steps = 0
    while not ours.done:
        allowed = compiler.allowed_mask([ours])[0]
        import numpy as np
        bits = np.unpackbits(np.frombuffer(bare.compute_bitmask(), dtype=np.uint8), bitorder="little")
        assert torch.equal(allowed, torch.from_numpy(bits[:TOKENIZER_VOCAB].astype(bool))), f"step {steps}"
        choice = allowed.nonzero().flatten()
        tok = int(choice[torch.randint(len(choice), (1,), generator=g)])
        assert ours.advance(tok) and bare.consume_token(tok)
        steps += 1
        assert steps < 200
    assert bare.is_stopped() and ours.accepting


def test_tag_tokens_are_text_and_special_tokens_are_not(model, tokenizer):
    # "</think>" is one added (non-special) token: it must count as the text it decodes to, or a grammar that
    # writes it could never be followed by a model that writes the token; <|im_end|> is special and never text.
    engine = make_engine(model, tokenizer)
    m = engine.structured.matcher(StructuredSpec.regex("a</think>b"))
    assert m.advance(ord("a"))
    allowed = engine.structured.allowed_mask([m])[0]
    assert allowed[TINY_IDS["</think>"]]  # (llguidance may insist on the tag token rather than its bytes)
    assert not allowed[TINY_IDS["<|im_end|>"]] and not allowed[TINY_IDS["<|im_start|>"]]
    assert m.advance(TINY_IDS["</think>"]) and m.advance(ord("b")) and m.done


def test_after_trigger_thinking_then_format(model, tokenizer):
    engine = make_engine(model, tokenizer)
    spec = StructuredSpec.regex("[0-9]{3}", after="</think>")
    think = [ord(c) for c in "so I think"]
    for trigger in ([TINY_IDS["</think>"]], [ord(c) for c in "</think>"]):  # the tag token, or spelled in bytes
        m = engine.structured.matcher(spec)
        for t in think:
            allowed = engine.structured.allowed_mask([m])[0]
            assert allowed[t] and not allowed[EOS]  # free text, but the answer must still come
            assert m.advance(t)
        for t in trigger + [ord("\n"), ord("\n")]:  # then up to two line breaks
            assert m.advance(t)
        allowed = engine.structured.allowed_mask([m])[0]
        assert set(allowed.nonzero().flatten().tolist()) == {ord(c) for c in "0123456789"}
        for c in "123":
            assert m.advance(ord(c))
        assert m.done
    # excluded strings may not occur in the free text; the trigger cannot occur twice
    m = engine.structured.matcher(StructuredSpec.regex("[0-9]{3}", after="</think>", after_excludes=["<tool_call>"]))
    assert m.advance(ord("a")) and not m.advance(TINY_IDS["<tool_call>"])
    m = engine.structured.matcher(spec)
    assert m.advance(TINY_IDS["</think>"]) and not m.advance(ord("x"))


def test_constrained_output_validates_for_many_seeds(model, tokenizer):
    """A random model, temperature 1, 8 requests x n=4 in one batch, plus unconstrained requests beside them: every
    constrained sample is valid JSON of the schema and ends because the grammar is complete."""
    engine = make_engine(model, tokenizer, max_num_seqs=40)
    spec = StructuredSpec.json(PERSON)
    prompts = [f"person {i}:" for i in range(8)] + ["free text", "more free text"]
    params = [SamplingParams(n=4, temperature=1.0, seed=100 * i, max_tokens=120, structured=spec) for i in range(8)]
    params += [SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)] * 2
    outs = run(engine, prompts, params)
    for out in outs[:8]:
        for o in out.outputs:
            assert o.finish_reason == "stop" and o.stop_reason is None, o.text
            jsonschema.validate(json.loads(o.text), PERSON)
            assert max(o.token_ids) < TOKENIZER_VOCAB
    texts = {o.text for out in outs[:8] for o in out.outputs}
    assert len(texts) > 16  # different seeds, different samples
    # the unconstrained rows were not masked: the same as without constrained neighbours
    alone = run(make_engine(model, tokenizer), prompts[8:], params[8:])
    assert [o.outputs[0].token_ids for o in outs[8:]] == [o.outputs[0].token_ids for o in alone]


def test_greedy_constrained_is_batch_independent(model, tokenizer):
    spec = StructuredSpec.json(PERSON)
    greedy = SamplingParams(temperature=0, max_tokens=120, structured=spec)
    solo = run(make_engine(model, tokenizer), ["who?"], greedy)[0].outputs[0]
    mixed = run(make_engine(model, tokenizer), ["x", "who?", "y"],
                [SamplingParams(temperature=1.0, seed=1, max_tokens=30), greedy,
                 SamplingParams(temperature=1.0, seed=2, max_tokens=60, structured=spec)])
    assert mixed[1].outputs[0].token_ids == solo.token_ids
    jsonschema.validate(json.loads(solo.text), PERSON)


def test_preemption_replays_nothing_and_keeps_the_grammar(model, tokenizer):
    """A cache too small for the batch: sequences are preempted and recomputed from their tokens, and the matcher
    (which follows the tokens, not the cache) stays valid; greedy results equal an unpressured run."""
    from tests.engine.test_engine import cache_bytes

    spec = StructuredSpec.json(PERSON)
    prompts = [f"rec {i}" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=90, structured=spec)
    roomy = run(make_engine(model, tokenizer), prompts, params)
    assert all(o.outputs[0].finish_reason == "stop" for o in roomy)
    # 32 blocks of 4 tokens: one sequence fits (128 tokens), the four together (~4 x 60) do not
    tight = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                        cache_memory=cache_bytes(model, 32, 4, 4))
    ids = [tight.add_request(p, params) for p in prompts]
    seqs = [s for rid in ids for s in tight.requests[rid].seqs]
    done = {}
    while tight.has_unfinished():
        for out in tight.step():
            if out.finished:
                done[out.request_id] = out
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid, ref in zip(ids, roomy):
        assert done[rid].outputs[0].token_ids == ref.outputs[0].token_ids
        jsonschema.validate(json.loads(done[rid].outputs[0].text), PERSON)


def test_matcher_resyncs_from_the_tokens(model, tokenizer):
    engine = make_engine(model, tokenizer)
    m = engine.structured.matcher(StructuredSpec.regex("abc|abd"))
    m.sync([ord("a"), ord("b")])  # e.g. tokens replaced behind its back: replayed from the start
    assert m.consumed == 2
    allowed = engine.structured.allowed_mask([m])[0]
    assert set(allowed.nonzero().flatten().tolist()) == {ord("c"), ord("d")}
    m.sync([ord("a"), ord("x"), ord("y")])  # tokens the grammar refuses: broken, and only the end is allowed
    assert m.error and m.done and m.consumed == 3
    assert set(engine.structured.allowed_mask([m])[0].nonzero().flatten().tolist()) == {EOS}


def test_finishes_when_the_grammar_is_complete(model, tokenizer):
    engine = make_engine(model, tokenizer)
    # ignore_eos and min_tokens beyond the grammar: a complete grammar still ends the sequence, as "stop"
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=50, min_tokens=10, ignore_eos=True,
                            structured=StructuredSpec.regex("(yes|no)!"))
    out = run(engine, ["answer:"], params)[0].outputs[0]
    assert out.text in ("yes!", "no!") and out.finish_reason == "stop" and out.stop_reason is None
    # a grammar that may end or go on: the end-of-sequence token is allowed once it is complete
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=50, structured=StructuredSpec.regex("x+"))
    outs = run(engine, ["go"] * 6, [dataclass_replace(params, seed=s) for s in range(6)])
    for o in outs:
        assert set(o.outputs[0].text) == {"x"}
        assert o.outputs[0].finish_reason in ("stop", "length")


def dataclass_replace(params, **kw):
    import dataclasses

    return dataclasses.replace(params, **kw)


def test_stop_strings_and_max_tokens_still_apply(model, tokenizer):
    engine = make_engine(model, tokenizer)
    cut = run(engine, ["p"], SamplingParams(temperature=0, max_tokens=3, structured=StructuredSpec.json(PERSON)))
    assert cut[0].outputs[0].finish_reason == "length" and cut[0].outputs[0].text == '{"n'
    stopped = run(engine, ["p"], SamplingParams(temperature=0, max_tokens=80, stop=['"age"'],
                                                 structured=StructuredSpec.json(PERSON)))
    o = stopped[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == '"age"' and o.text.startswith('{"name": "')


def test_padded_vocabulary_is_masked(model, tokenizer):
    # the padding rows have the largest logits: without the mask (and the vocab limit) they would win every step
    engine = make_engine(model, tokenizer)
    out = run(engine, ["p"] * 3, SamplingParams(temperature=0, max_tokens=60, structured=StructuredSpec.json_object()))
    for o in out:
        assert max(o.outputs[0].token_ids) < TOKENIZER_VOCAB
        assert isinstance(json.loads(o.outputs[0].text), dict)
    sampler = Sampler()
    logits = torch.zeros(1, MODEL_VOCAB)
    logits[0, 280] = 100.0
    mask = torch.zeros(1, 10, dtype=torch.bool)  # the grammar knows 10 tokens; 5 allowed
    mask[0, 5] = True
    r = sampler(logits, [SamplingParams(temperature=0)], [[]], [None], allowed_token_mask=mask)
    assert r.token_ids == [5]


def test_grammar_wins_over_the_min_tokens_block():
    # the grammar allows only the end, min_tokens forbids it: the row would have no token at all
    sampler = Sampler()
    logits = torch.randn(2, 20)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 7] = True  # 7 is the stop token
    mask[1, 3] = True
    r = sampler(logits, [SamplingParams(temperature=1.0)] * 2, [[], []], [None, None],
                min_tokens_mask_ids=[{7}, {7}], allowed_token_mask=mask)
    assert r.token_ids == [7, 3]


def test_bad_grammars_are_value_errors_naming_the_kind(model, tokenizer):
    engine = make_engine(model, tokenizer)
    for spec, words in [
        (StructuredSpec.json({"type": "object", "properties": {"a": {"type": "wat"}}}), "JSON schema"),
        (StructuredSpec.lark("start: undefined_rule"), "Lark grammar"),
        (StructuredSpec.regex("(unclosed"), "regex"),
        (StructuredSpec.json({"type": "string", "format": "no-such-format"}, strict=True), "JSON schema"),
    ]:
        with pytest.raises(ValueError, match=words):
            engine.add_request("p", SamplingParams(structured=spec))
    assert not engine.requests and not engine.scheduler.waiting
    # lenient (strict=False, the default): an unknown format is not enforced, not an error
    engine.check_structured(SamplingParams(structured=StructuredSpec.json({"type": "string", "format": "x-y"})))


def test_compiled_once_per_spec(model, tokenizer):
    engine = make_engine(model, tokenizer)
    spec = StructuredSpec.json(PERSON)
    run(engine, ["a", "b"], SamplingParams(n=3, max_tokens=5, structured=spec))
    run(engine, ["c"], SamplingParams(max_tokens=5, structured=StructuredSpec.json(json.loads(json.dumps(PERSON)))))
    assert engine.structured.compiles == 1
    assert engine.structured.stats()["mask_rows"] > 0


def test_compile_and_mask_cost_are_small(model, tokenizer):
    """Loose bounds on a loaded 2-core CI machine (measured: ~1 ms to compile, ~50 us per masked token here)."""
    engine = make_engine(model, tokenizer)
    compiler = engine.structured
    start = time.perf_counter()
    compiler.compile(StructuredSpec.json(PERSON))
    assert time.perf_counter() - start < 1.0
    matchers = [compiler.matcher(StructuredSpec.json(PERSON)) for _ in range(8)]
    start = time.perf_counter()
    for _ in range(10):
        compiler.allowed_mask(matchers)
    assert (time.perf_counter() - start) / 80 < 0.005


def test_without_llguidance_a_clear_error(model, tokenizer, monkeypatch):
    real_import = builtins.__import__

    def no_llguidance(name, *args, **kwargs):
        if name == "llguidance" or name.startswith("llguidance."):
            raise ImportError("No module named 'llguidance'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llguidance)
    engine = make_engine(model, tokenizer)
    with pytest.raises(ValueError, match=r"llguidance.*pip install 'qwen35\[structured\]'"):
        engine.add_request("p", SamplingParams(structured=StructuredSpec.json_object()))
    assert not engine.requests
    # requests without a spec do not need it
    assert run(engine, ["p"], SamplingParams(max_tokens=3))[0].finished


def test_structured_needs_a_tokenizer(model):
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=2))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(structured=StructuredSpec.json_object()))

"""Rollouts: qwen35's engine samples n completions per prompt and returns what an RL trainer needs.

Per completion token: the token, its logprob under the engine (the *behaviour* policy μ), the policy version
that sampled it, and for MoE models the routed expert ids of every position (routing replay, R3: the trainer's
routers take the rollout's choices, so trainer and engine run the same experts).

Why these settings:

* **Temperature 1, no filters.**  The engine reports *raw* logprobs (log-softmax of the model's logits, see
  engine/sampler.py); they are the probabilities tokens were drawn with only when nothing reshapes the
  distribution.  So rollouts sample at temperature 1 with top-k / top-p / min-p / penalties off, and anything
  else is refused by name rather than silently trained with the wrong μ.
* **Prefix caching off.**  After a weight update a cached prefix holds KV and DeltaNet states computed by old
  weights, and a prompt served from the cache runs no router, so its positions would have no recorded routing.
* **Speculative decoding** (``EngineConfig.speculative_config``) keeps the output distribution and reports the
  *target* model's logprobs for accepted draft tokens (LLMEngine._sample_verified), so it changes nothing here;
  the MTP block's own router is not the model's and is not recorded.
* **Partial rollouts.**  :meth:`RolloutWorker.set_weights` swaps weights between engine steps; sequences in
  flight keep their cache and continue under the new version.  Every token carries the version it was sampled
  under, and its logprob is the one of that version, so the trainer can mask or IS-correct the old-version part.

Routing is recorded with forward hooks on the main layers' routers (the model code stays stateless; the hooks
live here): one engine step is one forward over a packed row, and ``runner.last_segments`` says which rows
belong to which sequence and position.  A position computed twice (speculative drafts rejected, preemption)
keeps its last record, which is the one its accepted token followed.

Tool tasks are multi-turn episodes (qwen35.rl.tools): a turn that ends with tool calls gets the tool results
appended as inserted tokens (loss mask False) and the next turn is a follow-up request over prompt + completion
so far, its re-prefill forced onto the routing already recorded (:class:`RoutingForcer`); see
:class:`RolloutWorker`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from qwen35.engine import EngineConfig, LLMEngine, SamplingParams
from qwen35.model.moe import SparseMoE
from qwen35.rl.tools import ChatContext, ToolEnv, ToolEpisode


def moe_routers(model) -> list[torch.nn.Module]:
    """The routers of the main decoder layers (not the MTP block's), in layer order; [] for a dense model."""
    return [layer.mlp.gate for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]


class RoutingRecorder:
    """Collects each hooked router's chosen experts ([N, k] per layer) of the forwards run while attached."""

    def __init__(self, model) -> None:
        self.routers = moe_routers(model)
        self._captured: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._handles: list[Any] = []

    def attach(self) -> RoutingRecorder:
        for i, router in enumerate(self.routers):
            def hook(module, args, output, i=i):
                self._captured[i].append(output.experts.detach().to(torch.int16))
            self._handles.append(router.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> torch.Tensor | None:
        """[layers, N, k] of the one forward since the last take (None if none ran); raises if several ran."""
        if not self.routers or not self._captured[0]:
            return None
        if len(self._captured[0]) != 1:
            raise RuntimeError(f"{len(self._captured[0])} forwards since the last take; expected one per step")
        out = torch.stack([c[0] for c in self._captured])
        self._captured = [[] for _ in self.routers]
        return out


@contextlib.contextmanager
def replay_routing(model, experts: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the main layers' routers take ``experts`` [layers, N, k] (N = B·T of the next forward)
    instead of their own top-k (see ``Router.forward``).  None: a no-op (dense model, or replay off)."""
    if experts is None:
        yield
        return
    routers = moe_routers(model)
    if experts.shape[0] != len(routers):
        raise ValueError(f"replayed routing has {experts.shape[0]} layers, the model {len(routers)} MoE layers")
    handles = []
    for router, e in zip(routers, experts):
        def pre(module, args, kwargs, e=e):
            return args, {**kwargs, "experts": e}
        handles.append(router.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class RoutingForcer:
    """Inside the engine's forwards, the main layers' routers take given experts at the first positions of given
    sequences (``forced[seq_id]``: [layers, n, k] for positions 0..n-1) and route every other token as usual.

    Why: a tool episode's next turn is a new engine request that prefills prompt + completion so far again.  Its
    routers would route those positions anew: after a weight update between the turns with the new weights, and
    even under the same weights a near-tie may flip under the different program (a prefill chunk instead of the
    decode steps that produced them).  The trainer replays one routing per position, so it could not match both
    turns' logprobs.  Forcing the re-prefill onto the routing already recorded keeps one routing per position,
    the one every token of the sample was computed with (tests/rl/test_tools.py: without it the partial-episode
    test fails).

    Unforced rows take exactly the router's own top-k (the same arithmetic as ``Router.forward``)."""

    def __init__(self, model) -> None:
        self.routers = moe_routers(model)
        self.forced: dict[int, torch.Tensor] = {}
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # this forward: (packed rows, experts)
        self._handles = [model.model.layers[0].register_forward_pre_hook(self._plan)]
        for i, router in enumerate(self.routers):
            self._handles.append(router.register_forward_pre_hook(self._route(i), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _plan(self, module, args) -> None:
        """Before the first layer: which rows of the packed step row are forced (from the engine's segments)."""
        self._rows = None
        segments = getattr(args[1], "segments", None) if len(args) > 1 else None
        if not self.forced or not segments:
            return
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for seg in segments:
            f = self.forced.get(seg.seq.seq_id)
            if f is None or seg.past >= f.shape[1]:
                continue
            m = min(seg.length, f.shape[1] - seg.past)
            rows.extend(range(seg.start, seg.start + m))
            parts.append(f[:, seg.past:seg.past + m])
        if rows:
            self._rows = (torch.tensor(rows, dtype=torch.long), torch.cat(parts, dim=1).long())

    def _route(self, i: int):
        def pre(module, args, kwargs):
            if self._rows is None or kwargs.get("experts") is not None:
                return None
            x = args[0]
            probs = torch.softmax(F.linear(x, module.weight).float(), dim=-1)
            experts = probs.topk(module.top_k, dim=-1).indices
            rows, forced = self._rows
            experts[rows.to(experts.device)] = forced[i].to(experts.device)
            return args, {**kwargs, "experts": experts}
        return pre


@dataclass
class Sample:
    """One completion of one prompt, as the trainer takes it."""

    group: int  # the prompt's index in the run's prompt stream
    index: int  # which of the group's n samples
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour logprob of each completion token (the engine's raw logprob)
    versions: list[int]  # policy version that sampled each completion token
    loss_mask: list[bool]  # completion tokens to learn (False: tool results and other inserted text)
    text: str = ""
    finish_reason: str | None = None
    routing: torch.Tensor | None = None  # [moe layers, P + C - 1, k] int16: experts of every input position
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def oldest_version(self) -> int:
        return min(self.versions) if self.versions else -1

    @property
    def newest_version(self) -> int:
        return max(self.versions) if self.versions else -1


def rollout_params(n: int, max_tokens: int, seed: int | None, **extra: Any) -> SamplingParams:
    """Sampling for rollouts: temperature 1 and no filters (so the raw logprobs are μ), logprob of the chosen
    token, ``seed`` per request (sample i of a group draws from seed + i)."""
    bad = {k: v for k, v in extra.items() if k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                                  "presence_penalty", "frequency_penalty")}
    defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0}
    changed = sorted(k for k, v in bad.items() if v != defaults[k] and not (k == "top_k" and v == -1))
    if changed:
        raise ValueError(f"RL rollouts sample at temperature 1 with no filters or penalties (the engine's logprobs "
                         f"are raw, so only then are they the behaviour policy's); got {', '.join(changed)}")
    rest = {k: v for k, v in extra.items() if k not in bad}
    return SamplingParams(n=n, max_tokens=max_tokens, seed=seed, logprobs=0, **rest)


class RolloutWorker:
    """An engine over a model whose weights can be replaced between steps, tagging tokens with versions.

    Work is submitted as groups (one prompt, n samples) and advanced with :meth:`run`, which returns the groups
    that finished.  Plain Python: the Ray loop wraps it in an actor; tests drive it directly.

    **Tool episodes.**  A group submitted with a ``chat`` (:class:`ChatContext`: the conversation its prompt was
    rendered from) is a tool task: each sample is a :class:`ToolEpisode`.  When a sample's turn ends at
    ``<|im_end|>`` with tool calls, ``tool_env`` runs them, the template's tool-result text is appended (loss
    mask False, logprob 0.0, tagged with the version of the turn that made the calls) and the next turn is a
    follow-up request of that one sample whose prompt is prompt + completion so far (prefix caching is off, so it
    is prefilled again, under the weights current then).  With MoE routing recorded, that prefill is forced
    onto the routing already recorded for those positions (:class:`RoutingForcer`), so the sample has one
    routing per position, the one each of its tokens was computed with.  At most ``max_tool_rounds`` rounds;
    ``max_tokens`` bounds the whole completion, model and inserted tokens together.  The group is returned when
    every episode has ended; ``Sample.text`` is then the last turn's text (the answer the reward reads) and
    ``Sample.info`` holds the turns and the calls."""

    def __init__(self, model, tokenizer, engine_config: EngineConfig | None = None, *, version: int = 0,
                 record_routing: bool = True, tool_env: ToolEnv | None = None, max_tool_rounds: int = 4) -> None:
        cfg = engine_config or EngineConfig()
        if cfg.enable_prefix_caching:
            cfg = dataclasses.replace(cfg, enable_prefix_caching=False)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, cfg)
        self.version = version
        self.recorder = RoutingRecorder(model).attach() if record_routing and moe_routers(model) else None
        self.forcer = RoutingForcer(model) if self.recorder is not None else None
        if not isinstance(max_tool_rounds, int) or max_tool_rounds < 1:
            raise ValueError(f"max_tool_rounds must be a positive integer, got {max_tool_rounds!r}")
        self.tool_env, self.max_tool_rounds = tool_env, max_tool_rounds
        self._episodes: dict[int, list[ToolEpisode]] = {}  # tool group -> its samples' episodes
        self._params: dict[int, SamplingParams] = {}  # tool group -> its sampling parameters
        self._sample_of: dict[str, int] = {}  # follow-up request id -> the sample it continues
        self._groups: dict[str, tuple[int, list[int]]] = {}  # request id -> (group, prompt ids)
        self._versions: dict[tuple[str, int], list[int]] = {}
        self._routing: dict[int, torch.Tensor] = {}  # seq id -> [layers, capacity, k]
        self._filled: dict[int, int] = {}  # seq id -> positions recorded so far (all of 0..filled-1)
        self._seq_of: dict[tuple[str, int], int] = {}
        self.busy_seconds = 0.0
        self.steps = 0
        self.tokens = 0

    # -- weights --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Copy ``state`` into the model in place (no new engine, no restart); sequences in flight continue
        under it.  Returns the version now served."""
        t0 = time.perf_counter()
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("mtp.")]  # a state without the MTP block keeps it
        if missing or unexpected:
            raise ValueError(f"weights do not fit the rollout model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
        self.version = int(version)
        self.busy_seconds += time.perf_counter() - t0
        return self.version

    # -- work -----------------------------------------------------------------------------------------------
    def submit(self, group: int, prompt_ids: Sequence[int], params: SamplingParams,
               chat: ChatContext | None = None) -> None:
        """Start a group of ``params.n`` samples of one prompt; ``chat`` makes it a tool task (see the class)."""
        rid = f"group-{group}"
        if rid in self._groups or group in self._episodes:
            raise ValueError(f"group {group} is already being generated")
        if chat is not None:
            if self.tool_env is None:
                raise ValueError(f"group {group} is a tool task, but this rollout worker has no tool environment "
                                 "(RolloutWorker(..., tool_env=ToolEnv(...)))")
            if self.tokenizer is None:
                raise ValueError(f"group {group} is a tool task: its turns are parsed and its tool results rendered "
                                 "with the tokenizer, and this rollout worker has none")
        self.engine.add_request(list(prompt_ids), params, request_id=rid)
        if chat is not None:
            budget = params.max_tokens if params.max_tokens is not None else \
                self.engine.max_model_len - len(prompt_ids)
            self._episodes[group] = [ToolEpisode(self.tool_env, self.tokenizer, chat, list(prompt_ids), budget,
                                                 self.max_tool_rounds, self.engine.max_model_len)
                                     for _ in range(params.n)]
            self._params[group] = params
        self._groups[rid] = (group, list(prompt_ids))
        for seq in self.engine.requests[rid].seqs:
            self._seq_of[(rid, seq.index)] = seq.seq_id
            self._versions[(rid, seq.index)] = []

    @property
    def pending_groups(self) -> list[int]:
        return sorted({g for g, _ in self._groups.values()})

    def abort_all(self) -> list[int]:
        """Drop every group in flight (their ids are returned), e.g. before a restart from a checkpoint."""
        groups = self.pending_groups
        for rid in list(self._groups):
            self.engine.abort(rid)
            self._forget(rid)
        self._episodes.clear()
        self._params.clear()
        return groups

    def run(self, max_steps: int | None = None) -> list[list[Sample]]:
        """Advance the engine by up to ``max_steps`` steps (None: until every submitted group is done); returns
        the groups that finished, each as its n samples in order."""
        t0 = time.perf_counter()
        done: list[list[Sample]] = []
        steps = 0
        while self.engine.has_unfinished() and (max_steps is None or steps < max_steps):
            outputs = self.engine.step()
            steps += 1
            self._record_routing()
            for out in outputs:
                for o in out.outputs:
                    tags = self._versions[(out.request_id, o.index)]
                    new = len(o.token_ids) - len(tags)
                    tags.extend([self.version] * new)
                    self.tokens += new
                if out.finished:
                    finished = self._finish(out)
                    if finished is not None:
                        done.append(finished)
        self.steps += steps
        self.busy_seconds += time.perf_counter() - t0
        return done

    def generate(self, groups: Sequence[tuple[int, Sequence[int]]], params: SamplingParams) -> list[list[Sample]]:
        """Submit every (group, prompt ids) and run them to completion; groups in the order given."""
        for g, ids in groups:
            self.submit(g, ids, params)
        done = {s[0].group: s for s in self.run()}
        return [done[g] for g, _ in groups]

    # -- internals ------------------------------------------------------------------------------------------
    def _record_routing(self) -> None:
        if self.recorder is None:
            return
        experts = self.recorder.take()
        if experts is None:
            return
        for seg in self.engine.runner.last_segments:
            sid = seg.seq.seq_id
            buf = self._routing.get(sid)
            end = seg.past + seg.length
            if buf is None or buf.shape[1] < end:
                cap = max(end, 2 * (buf.shape[1] if buf is not None else 64))
                grown = torch.zeros(experts.shape[0], cap, experts.shape[2], dtype=torch.int16)
                if buf is not None:
                    grown[:, :buf.shape[1]] = buf
                buf = self._routing[sid] = grown
            buf[:, seg.past:end] = experts[:, seg.start:seg.start + seg.length]
            if seg.past <= self._filled.get(sid, 0):
                self._filled[sid] = max(self._filled.get(sid, 0), end)

    def _taken_routing(self, rid: str, index: int, n_in: int, group: int) -> torch.Tensor | None:
        """The recorded experts of input positions 0..n_in-1 of a finished sequence (None: not recording)."""
        if self.recorder is None:
            return None
        sid = self._seq_of[(rid, index)]
        if self._filled.get(sid, 0) < n_in:
            raise RuntimeError(f"group {group}: routing recorded for {self._filled.get(sid, 0)} of {n_in} positions")
        return self._routing[sid][:, :n_in].clone()

    def _finish(self, out) -> list[Sample] | None:
        """A request finished: its group's samples, or None while tool episodes of the group go on."""
        rid = out.request_id
        group, prompt = self._groups[rid]
        if group in self._episodes:
            return self._finish_turn(out, group, prompt)
        samples = []
        for o in out.outputs:
            ids = list(o.token_ids)
            # every input position of the trainer's forward
            routing = self._taken_routing(rid, o.index, len(prompt) + len(ids) - 1, group)
            lps = [float(x) for x in (o.logprobs or [])]
            if len(lps) != len(ids):
                raise RuntimeError(f"group {group}: {len(lps)} logprobs for {len(ids)} tokens")
            samples.append(Sample(group, o.index, list(prompt), ids, lps, list(self._versions[(rid, o.index)]),
                                  [True] * len(ids), o.text, o.finish_reason, routing))
        self._forget(rid)
        return samples

    def _finish_turn(self, out, group: int, prompt: list[int]) -> list[Sample] | None:
        """A turn of tool episodes finished: run their tool calls and start their next turns, or end them."""
        rid = out.request_id
        episodes = self._episodes[group]
        for o in out.outputs:
            i = self._sample_of.get(rid, o.index)
            ep = episodes[i]
            ids = list(o.token_ids)
            lps = [float(x) for x in (o.logprobs or [])]
            if len(lps) != len(ids):
                raise RuntimeError(f"group {group}: {len(lps)} logprobs for {len(ids)} tokens")
            ep.add_turn(ids, lps, self._versions[(rid, o.index)], o.text, o.finish_reason)
            if self.recorder is not None:  # covers every earlier turn too: this request's prefill was forced
                ep.routing = self._taken_routing(rid, o.index, len(prompt) + len(ids) - 1, group)
            nxt = ep.next_prompt()
            if nxt is not None:
                self._follow_up(group, i, ep, nxt)
        self._forget(rid)
        if not all(ep.done for ep in episodes):
            return None
        del self._episodes[group]
        self._params.pop(group, None)
        return [Sample(group, i, list(ep.prompt_ids), list(ep.ids), list(ep.logprobs), list(ep.versions),
                       list(ep.loss_mask), ep.text, ep.finish_reason, ep.routing, info=ep.info())
                for i, ep in enumerate(episodes)]

    def _follow_up(self, group: int, index: int, ep: ToolEpisode, prompt_ids: list[int]) -> None:
        """The next turn of one episode: a request of one sample, seeded apart from every other turn."""
        base = self._params[group]
        seed = None if base.seed is None else base.seed + index + 1_000_003 * ep.rounds
        params = dataclasses.replace(base, n=1, seed=seed, max_tokens=ep.remaining_tokens)
        rid = f"group-{group}/sample-{index}/turn-{ep.rounds}"
        self.engine.add_request(prompt_ids, params, request_id=rid)
        self._groups[rid] = (group, prompt_ids)
        self._sample_of[rid] = index
        sid = self.engine.requests[rid].seqs[0].seq_id
        self._seq_of[(rid, 0)] = sid
        self._versions[(rid, 0)] = []
        if self.forcer is not None and ep.routing is not None:
            self.forcer.forced[sid] = ep.routing

    def _forget(self, rid: str) -> None:
        self._groups.pop(rid, None)
        self._sample_of.pop(rid, None)
        for key in [k for k in self._versions if k[0] == rid]:
            self._versions.pop(key, None)
            sid = self._seq_of.pop(key, None)
            if sid is not None:
                self._routing.pop(sid, None)
                self._filled.pop(sid, None)
                if self.forcer is not None:
                    self.forcer.forced.pop(sid, None)

    def stats(self) -> dict[str, float]:
        return {"busy_seconds": self.busy_seconds, "steps": self.steps, "tokens": self.tokens,
                "version": self.version}


__all__ = ["RolloutWorker", "Sample", "RoutingRecorder", "RoutingForcer", "replay_routing", "moe_routers",
           "rollout_params"]

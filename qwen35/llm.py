"""``LLM``: the text-level facade over the engine, for scripts, the CLI and the server.

    llm = qwen35.LLM()                                     # the embedded model; or LLM("path/to/Qwen3.5-0.8B")
    print(llm.chat([{"role": "user", "content": "What is 47 + 38?"}]).content)
    out = llm.generate(["Hello"], qwen35.SamplingParams(max_tokens=32))[0]

It owns what turns text into tokens and back: loading the checkpoint (and int8 quantization), the tokenizer, the
chat template and the reasoning / tool-call parsers (``qwen35.chat``).  The token-level engine it drives lives in
``qwen35.engine`` and knows none of these.

Sampling defaults: a call without ``params`` uses :meth:`LLM.get_default_sampling_params` -- the checkpoint's
``generation_config.json`` (greedy when it says ``do_sample: false``), with no token limit other than the context,
so a chat answer runs to the end of its turn.  The CLI and the server take the same defaults.

Pictures: ``chat`` takes image / video content parts (OpenAI's ``image_url`` / ``video_url`` or transformers'
``image`` / ``video``; paths, bytes, PIL images, ``data:`` URLs), ``generate`` takes vLLM's
``{"prompt": ..., "multi_modal_data": {"image": ..., "video": ...}}``; they are loaded under ``media_policy`` and
preprocessed with the checkpoint's processor configs (qwen35.chat.vision_prompt).  A model without a vision tower
refuses them by name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .chat.vision_prompt import MediaPolicy
from .engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams, VisionInput
from .engine.params import sampling_defaults

__all__ = ["LLM", "embedded_model_path", "no_vision_reason", "parse_bytes"]

# a prompt: text, token ids, or vLLM's dict {"prompt" | "prompt_token_ids": ..., "multi_modal_data": {...}}
Prompt = str | list[int] | Mapping[str, Any]

EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "default"


def embedded_model_path() -> Path | None:
    """The model shipped inside the package (trained by ``qwen35.train.embedded``), or None if this build lacks it."""
    p = EMBEDDED_MODEL_DIR
    return p if (p / "config.json").exists() and (p / "tokenizer.json").exists() else None


def default_model_path() -> Path:
    """The model used when none is given: the embedded one.  A build without it says so instead of guessing."""
    path = embedded_model_path()
    if path is None:
        raise ValueError(f"this build of qwen35 has no embedded model ({EMBEDDED_MODEL_DIR} is missing or "
                         "incomplete); pass a checkpoint folder")
    return path


def no_vision_reason(model: Any) -> str | None:
    """Why a loaded model cannot take images or videos, as the message a refusal gives; None when it can.
    (The server refuses picture parts with the same words as :meth:`LLM.vision_preparer`.)"""
    if getattr(model, "visual", None) is not None:
        return None
    why = ("its config has no vision_config" if model.config.vision is None
           else "its checkpoint holds no model.visual.* weights")
    return f"this model cannot take images or videos: it has no vision tower ({why})"


def _gguf_tokenizer_folder(path: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder holding the tokenizer files rebuilt from a GGUF's metadata (qwen35.chat.gguf_vocab)."""
    from .chat.gguf_vocab import write_tokenizer_files
    from .quant.gguf import read_gguf_metadata

    folder = tempfile.TemporaryDirectory(prefix="qwen35-gguf-tokenizer-")
    try:
        write_tokenizer_files(read_gguf_metadata(path), folder.name)
    except BaseException:
        folder.cleanup()
        raise
    return folder


def parse_bytes(value: int | str | None) -> int | None:
    """'2GiB', '512MiB', '1.5GB', '300000000' or an int -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip()
    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "kb": 10 ** 3, "mb": 10 ** 6,
             "gb": 10 ** 9, "tb": 10 ** 12, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "b": 1}
    low = s.lower()
    for unit in sorted(units, key=len, reverse=True):
        if low.endswith(unit):
            try:
                return int(float(low[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a memory size (e.g. '2GiB', '512MiB')") from None


class LLM:
    """A loaded model with its tokenizer and an engine; every method batches continuously.

    ``model``: a checkpoint folder or a llama.cpp ``.gguf`` file (None: the embedded model).  ``tokenizer``: a folder (or tokenizer.json) to take
    the tokenizer from instead of the checkpoint's.  ``skip_tokenizer_init=True`` loads no tokenizer at all:
    prompts must then be token ids and outputs carry ids only (``text`` stays empty), as in vLLM.
    ``speculative_config``: e.g. ``{"method": "ngram", "num_speculative_tokens": 3}`` (a dict or its JSON text)
    drafts tokens by prompt lookup and verifies them in one forward; the output distribution is unchanged (greedy
    output is token-identical), see ``qwen35/engine/speculative.py``; ``{"method": "mtp", ...}`` drafts with the
    checkpoint's MTP block.  ``enable_prefix_caching`` (default True) resumes requests from cached prefixes (KV
    blocks and DeltaNet state snapshots; ``RequestOutput.num_cached_tokens`` says how many prompt tokens hit).
    ``kv_cache_dtype``: "auto" (keys and values in the model dtype), "int8" or "fp8" (one byte per value plus a
    float32 scale per token per KV head: about half the attention layers' cache memory, so about twice the
    context in the same ``cache_memory``; see ``qwen35/engine/kv_quant.py``).
    """

    def __init__(self, model: str | os.PathLike | None = None, dtype: str | torch.dtype = "auto", *,
                 tokenizer: str | os.PathLike | None = None, skip_tokenizer_init: bool = False,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 512, block_size: int = 16,
                 cache_memory: int | str | None = None, max_model_len: int | None = None,
                 threads: int | None = None, quantization: str | None = None,
                 speculative_config: Mapping[str, Any] | str | None = None,
                 enable_prefix_caching: bool = True, media_policy: MediaPolicy | None = None,
                 kv_cache_dtype: str = "auto") -> None:
        from .chat.tokenizer import Tokenizer, TokenizerError
        from .checkpoint import load_model
        from .engine.kv_quant import check_kv_cache_dtype
        from .kernels.ops import check_switches

        check_switches()  # a bad QWEN35_CPU_BF16 / QWEN35_NATIVE_ISA fails here, not in the first forward
        check_kv_cache_dtype(kv_cache_dtype)  # and a bad KV format before the weights are read
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        if quantization not in (None, "int8", "int4", "fp8"):
            raise ValueError(f"quantization must be None, 'int8', 'int4' or 'fp8', got {quantization!r}")
        from .quant.saved import FORMATS as SAVED_FORMATS

        # every format (fp8, int8, int4: qwen35/quant/saved.py) is applied while loading, tensor by tensor, so the
        # float model is never built (a folder already in that format loads as stored); None keeps a quantized
        # folder (official FP8, or what `qwen35 quantize` wrote) quantized unless dtype is given explicitly.  A
        # GGUF loads float and is quantized in memory after.
        at_load = quantization if quantization in SAVED_FORMATS else "auto" if quantization is None else None
        path = Path(model) if model is not None else default_model_path()
        self.model_path = path
        is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
        if is_gguf:  # llama.cpp's one-file format: weights, config and tokenizer together
            from .quant.gguf import load_gguf
            self.model = load_gguf(path, dtype=dtype)
        else:
            self.model = load_model(path, dtype=dtype, quantization=at_load)
        # a GGUF's tokenizer is rebuilt as files in a folder that lives as long as this LLM (save_pretrained
        # copies them from there)
        self._gguf_tokenizer_dir: tempfile.TemporaryDirectory | None = None
        if quantization in SAVED_FORMATS:
            if getattr(self.model, "quantization", None) != quantization:  # a GGUF: quantized after loading
                from .quant.saved import get_format
                get_format(quantization).quantize_model(self.model)
        self.tokenizer: Tokenizer | None = None
        if not skip_tokenizer_init:
            source = Path(tokenizer) if tokenizer is not None else path
            try:
                if is_gguf and tokenizer is None:
                    self._gguf_tokenizer_dir = _gguf_tokenizer_folder(path)
                    source = Path(self._gguf_tokenizer_dir.name)
                self.tokenizer = Tokenizer(source)
            except TokenizerError as e:
                if tokenizer is None:
                    raise TokenizerError(f"{e}; pass tokenizer=PATH (a folder with a tokenizer.json), or "
                                         "skip_tokenizer_init=True to work with token ids only") from None
                raise
        from .engine.speculative import SpeculativeConfig

        config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              block_size=block_size, cache_memory=parse_bytes(cache_memory),
                              max_model_len=max_model_len,
                              speculative_config=SpeculativeConfig.parse(speculative_config),
                              enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype)
        self.engine = LLMEngine(self.model, self.tokenizer, config)
        self.media_policy = media_policy  # where pictures may come from (None: MediaPolicy's defaults)
        self._vision_preparer = None

    # -- pictures -------------------------------------------------------------------------------------------
    @property
    def supports_vision(self) -> bool:
        return getattr(self.model, "visual", None) is not None

    def vision_preparer(self):
        """The :class:`~qwen35.chat.vision_prompt.VisionPreparer` of this checkpoint (its processor configs);
        ``ValueError`` naming why for a model without a vision tower."""
        refusal = no_vision_reason(self.model)
        if refusal is not None:
            raise ValueError(refusal)
        if self._vision_preparer is None:
            from .chat.vision_prompt import VisionPreparer

            self._vision_preparer = VisionPreparer.for_folder(self.model_path, self.media_policy)
        return self._vision_preparer

    def _with_pictures(self, text: str, parts: Sequence[Any]) -> tuple[str, VisionInput | None]:
        if not parts:
            return text, None
        prepared = self.vision_preparer().prepare(text, parts)
        return prepared.text, VisionInput(**prepared.tensors())

    def _request(self, prompt: Prompt) -> tuple[str | list[int], VisionInput | None]:
        """A prompt as the engine takes it: text or ids, and the pictures of vLLM's ``multi_modal_data``."""
        if not isinstance(prompt, Mapping):
            return prompt, None
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"})
        if unknown:
            raise ValueError(f"a prompt dict takes 'prompt' or 'prompt_token_ids' and 'multi_modal_data', not "
                             f"{', '.join(unknown)}")
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise ValueError("a prompt dict needs exactly one of 'prompt' (text) and 'prompt_token_ids'")
        data = prompt.get("multi_modal_data") or {}
        if not isinstance(data, Mapping) or set(data) - {"image", "video"}:
            raise ValueError("multi_modal_data takes 'image' and 'video' (one picture or a list each)")
        from .chat.vision_prompt import MediaPart

        parts = []
        for kind in ("image", "video"):
            items = data.get(kind)
            if items is None:
                continue
            # a video given as a list of frames is one item; a list of videos is a list of such items
            many = isinstance(items, (list, tuple)) and not (kind == "video" and items and not isinstance(
                items[0], (list, tuple, str, bytes, os.PathLike)))
            for k, item in enumerate(items if many else [items]):
                parts.append(MediaPart(kind, item, f"multi_modal_data[{kind!r}][{k}]"))
        if "prompt_token_ids" in prompt:
            if parts:
                raise ValueError("pictures with prompt_token_ids are not supported: give the prompt as text with "
                                 "one <|image_pad|> / <|video_pad|> per picture, and the engine expands them")
            return list(prompt["prompt_token_ids"]), None
        return self._with_pictures(prompt["prompt"], parts)

    # -- defaults -------------------------------------------------------------------------------------------
    @property
    def generation_config(self) -> dict[str, Any]:
        """The checkpoint's generation_config.json ({} without a tokenizer or file)."""
        return dict(getattr(self.tokenizer, "generation_config", None) or {})

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without ``params`` uses: the checkpoint's recommended sampling (generation_config.json;
        greedy when it says ``do_sample: false``), no limit but the context."""
        return SamplingParams(max_tokens=None, **sampling_defaults(self.generation_config))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a folder this class loads again: weights and config in the official layout, plus the tokenizer,
        chat template and generation_config of the checkpoint this was loaded from."""
        from .checkpoint import save_pretrained

        save_pretrained(self.model, folder, tokenizer_from=self.tokenizer.path if self.tokenizer else None)

    # -- batch ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion (continuously batched); one RequestOutput per prompt, in order."""
        single = isinstance(prompts, (str, Mapping)) or (isinstance(prompts, list) and prompts
                                                           and isinstance(prompts[0], int))
        plist: list[Prompt] = [prompts] if single else list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params_list = [params or self.get_default_sampling_params()] * len(plist)
        else:
            params_list = list(params)
            if len(params_list) != len(plist):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(plist)} prompts")
        requests = [self._request(p) for p in plist]  # every picture loaded before anything is queued
        return self._run(requests, params_list, use_tqdm)

    def _run(self, requests: Sequence[tuple[str | list[int], VisionInput | None]],
             params_list: Sequence[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        ids = [self.engine.add_request(p, sp, vision=v) for (p, v), sp in zip(requests, params_list)]
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]

    # -- chat -----------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             params: SamplingParams | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] | None = "auto", enable_thinking: bool | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None, parallel_tool_calls: bool = True,
             use_tqdm: bool = False, response_format: Mapping[str, Any] | None = None) -> Any:
        """Answer a conversation (OpenAI-style messages) through the chat template.

        Returns a :class:`~qwen35.chat.completion.ChatResult`: ``reasoning`` (the thinking), ``content``,
        ``tool_calls`` (parsed from Qwen's XML calls, arguments as JSON text), ``finish_reason``, ``token_ids``,
        ``usage``, ``message`` (to append to the history), and ``choices`` for ``params.n > 1``.  A list of
        conversations gives a list of results, generated as one batch.  ``tool_choice`` is "auto", "none",
        "required" or ``{"type": "function", "function": {"name": ...}}``; "required" and a named function are
        forced by prefilling the start of a call and a grammar for the rest (see qwen35/chat/completion.py).
        ``response_format`` is OpenAI's (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}}}``), enforced by grammar-constrained decoding after the reasoning; the
        grammars need ``pip install 'qwen35[structured]'``.  Thinking is on unless
        ``enable_thinking=False`` (or ``chat_template_kwargs={"enable_thinking": False}``).  Without ``params``
        the answer runs to the end of its turn with the checkpoint's sampling defaults.
        """
        from .chat.completion import build_chat_prompt, chat_result
        from .chat.vision_prompt import media_parts

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (this LLM was made with skip_tokenizer_init=True)")
        batch = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batch else [messages]
        prompts = [build_chat_prompt(self.tokenizer, conv, tools=tools, tool_choice=tool_choice,
                                     enable_thinking=enable_thinking, chat_template_kwargs=chat_template_kwargs,
                                     parallel_tool_calls=parallel_tool_calls, response_format=response_format)
                   for conv in conversations]
        base = params if params is not None else self.get_default_sampling_params()
        # every picture loaded before anything is queued: a bad one fails the call, not half a batch
        requests = [self._with_pictures(p.text, media_parts(conv)) for conv, p in zip(conversations, prompts)]
        outputs = self._run(requests, [p.sampling_params(base) for p in prompts], use_tqdm)
        results = [chat_result(p, o) for p, o in zip(prompts, outputs)]
        return results if batch else results[0]

    # -- streaming ------------------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each step this request produced tokens; ``outputs[i].delta_text`` is the new
        text (always whole UTF-8 characters), and the deltas concatenate to the final text."""
        text, vision = self._request(prompt)
        rid = self.engine.add_request(text, params if params is not None else self.get_default_sampling_params(),
                                      vision=vision)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)


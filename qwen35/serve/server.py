"""Load a model and serve it over HTTP with uvicorn (what ``qwen35 serve`` runs)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ..chat.media import MediaLimits
from ..chat.vision_prompt import MediaPolicy
from .app import DEFAULT_MAX_BODY_BYTES, create_app

log = logging.getLogger("qwen35.serve")


def media_policy(allowed_local_media_path: str | os.PathLike | None = None, allow_remote_media: bool = False,
                 media_fetch_timeout_s: float = 10.0, max_image_pixels: int | None = None) -> MediaPolicy:
    """The server's picture policy: clients may send ``data:`` URLs only, unless the operator names a folder
    whose files they may refer to, or allows fetching remote URLs (the server then makes requests where its
    clients say: allow it only where that is safe).  ``ValueError`` names a bad setting."""
    root = None
    if allowed_local_media_path is not None:
        root = Path(allowed_local_media_path).expanduser()
        if not root.is_dir():
            raise ValueError(f"the allowed local media path (--allowed-local-media-path) {allowed_local_media_path} "
                             "is not a folder")
        root = root.resolve()
    if not (math.isfinite(media_fetch_timeout_s) and media_fetch_timeout_s > 0):
        raise ValueError(f"the media fetch timeout (--media-fetch-timeout) must be a positive number of seconds, "
                         f"got {media_fetch_timeout_s}")
    limits = MediaLimits() if max_image_pixels is None else MediaLimits(max_image_pixels=max_image_pixels)
    return MediaPolicy(allow_local=root is not None, local_root=root, allow_remote=allow_remote_media,
                       remote_timeout_s=media_fetch_timeout_s, limits=limits)


def serve(model: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_model_name: str | None = None, dtype: str = "auto",
          max_num_seqs: int = 16, max_num_batched_tokens: int = 512, cache_memory: int | str | None = None,
          max_model_len: int | None = None, threads: int | None = None, max_tokens_cap: int | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, quantization: str | None = None,
          speculative_config: str | dict | None = None, enable_prefix_caching: bool = True,
          allowed_local_media_path: str | os.PathLike | None = None, allow_remote_media: bool = False,
          media_fetch_timeout_s: float = 10.0, max_image_pixels: int | None = None,
          log_level: str = "info", kv_cache_dtype: str = "auto") -> None:
    """Load ``model`` (default: the embedded model) and serve it until interrupted.

    Binds to the loopback interface unless ``host`` says otherwise: exposing a model to the network is a decision
    to make explicitly (with ``api_key`` set).  The model is served as ``served_model_name`` (default: the
    checkpoint folder's name); requests naming another model get 404.  ``enable_prefix_caching=False`` recomputes
    every prompt from the start; ``kv_cache_dtype`` "int8" / "fp8" stores the KV cache in one byte per value (see
    ``qwen35.LLM``).

    Pictures (a model with a vision tower): ``data:`` URLs are always taken; local files only from inside
    ``allowed_local_media_path`` (a folder), http(s) URLs only with ``allow_remote_media`` (fetched with
    ``media_fetch_timeout_s`` and the byte limits of ``MediaLimits``).  ``max_image_pixels`` lowers the largest
    picture, as its header declares it, that is decoded at all (default: ``MediaLimits``').
    """
    # first: a bad setting fails before anything is loaded or logging is touched
    policy = media_policy(allowed_local_media_path, allow_remote_media, media_fetch_timeout_s, max_image_pixels)

    import uvicorn

    from ..engine import AsyncLLM
    from ..llm import LLM

    # qwen35's own loggers (the per-request access lines of "qwen35.access", engine errors) at uvicorn's level;
    # without a handler only warnings would reach the terminal
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("qwen35")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(log_level.upper())

    extra = {"quantization": quantization} if quantization else {}  # e.g. "int8" weights
    if speculative_config is not None:
        extra["speculative_config"] = speculative_config
    if not enable_prefix_caching:
        extra["enable_prefix_caching"] = False
    if kv_cache_dtype != "auto":
        extra["kv_cache_dtype"] = kv_cache_dtype
    llm = LLM(model, dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
              cache_memory=cache_memory, max_model_len=max_model_len, threads=threads, media_policy=policy, **extra)
    name = served_model_name or Path(llm.model_path).name
    vision = llm.vision_preparer() if llm.supports_vision else None  # else picture parts get 400 saying why
    engine = AsyncLLM(llm.engine)
    try:
        app = create_app(engine, name, api_key=api_key, max_body_bytes=max_body_bytes, max_tokens_cap=max_tokens_cap,
                         vision=vision)
        if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            log.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                        host)
        pictures = ("images and videos: data: URLs" + (f", files in {policy.local_root}" if policy.allow_local else "")
                    + (", http(s) URLs" if policy.allow_remote else "")) if vision is not None else "text only"
        print(f"qwen35: serving '{name}' at http://{host}:{port}/v1 (context {llm.engine.max_model_len} tokens, "
              f"{max_num_seqs} sequences at once; {pictures})", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()

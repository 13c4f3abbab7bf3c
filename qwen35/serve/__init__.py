"""OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine's AsyncLLM.

    from qwen35.serve import create_app, serve
    serve("path/to/Qwen3.5-0.8B", port=8000)              # blocks; or `qwen35 serve --model PATH`
    app = create_app(async_llm, "my-model", api_key="k")  # to mount or run the app yourself

Needs the ``serve`` extra (fastapi, uvicorn, pydantic, prometheus-client).
"""

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]

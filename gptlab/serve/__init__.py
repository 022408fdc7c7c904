"""OpenAI-compatible serving: `create_app` / `serve` (FastAPI + uvicorn), the continuous-batching
`Engine`, the ChatML chat template (`render_chat`) and the playground page.

FastAPI is imported only when an app is built: `pip install 'gptlab[serve]'`.
"""

from __future__ import annotations

__all__ = ["ConnectionLimits", "Engine", "ServerLimits", "create_app", "render_chat", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from gptlab.serve import app

        return getattr(app, name)
    if name == "ConnectionLimits":
        from gptlab.serve.connections import ConnectionLimits

        return ConnectionLimits
    if name == "ServerLimits":
        from gptlab.serve.handlers import ServerLimits

        return ServerLimits
    if name == "Engine":
        from gptlab.serve.engine import Engine

        return Engine
    if name == "render_chat":
        from gptlab.serve.chat import render_chat

        return render_chat
    raise AttributeError(f"module 'gptlab.serve' has no attribute {name!r}")

"""OpenAI-compatible HTTP server on the engine (`trtllm-serve`); see docs/serve.md.

    from trtllm.serve import build_app
    app = build_app(llm, served_model_name="name")   # a FastAPI app; run it with uvicorn
"""
from trtllm.serve.app import build_app

__all__ = ["build_app"]

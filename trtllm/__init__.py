"""trtllm: a kernel-first LLM inference compiler and runtime."""
from trtllm.compile import CompiledModel, CompileError, compile
from trtllm.models.loader import load_model

__all__ = ["compile", "CompiledModel", "CompileError", "load_model"]

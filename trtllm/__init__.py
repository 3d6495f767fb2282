"""trtllm: a kernel-first LLM inference compiler and runtime."""

from trtllm.models.loader import load_model

"""trtllm: a kernel-first LLM inference compiler and runtime."""

"""Entry points reserved for commands not built yet: they say so and exit 2."""
import sys


def _reserved(name: str) -> int:
    print(f"{name}: not implemented yet in trtllm; available today: trtllm-run, trtllm-serve, "
          "trtllm-bench, trtllm-eval (and the Python API: trtllm.LLM, trtllm.compile)", file=sys.stderr)
    return 2


def build() -> int:
    return _reserved("trtllm-build")


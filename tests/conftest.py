import os

# Exercise every Triton kernel on CPU through the interpreter. Must be set before
# triton (and so trtllm) is imported: @triton.jit reads it at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

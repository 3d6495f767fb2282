import pytest


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """Runtime tests drive whole engines for many steps: they run the ops' torch
    references on CPU instead of the Triton interpreter (tens of times faster). The
    kernels themselves are checked against those references in tests/kernels, and
    through trtllm.compile in tests/test_ragged_batch.py."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

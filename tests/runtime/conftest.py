import pytest

from tests.models.checkpoints import write_checkpoint


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """Runtime tests drive whole engines for many steps: they run the ops' torch
    references on CPU instead of the Triton interpreter (tens of times faster). The
    kernels themselves are checked against those references in tests/kernels, and
    through trtllm.compile in tests/test_ragged_batch.py."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small random Llama checkpoint (vocab 512), one per test module. test_llm.py
    overrides it with one per family."""
    return write_checkpoint("llama31", tmp_path_factory.mktemp("llama"), vocab_size=512)

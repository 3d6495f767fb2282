import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, KvCacheConfig


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """Evaluation drives whole engines: the ops' torch references, not the Triton
    interpreter (as tests/runtime/conftest.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random Llama (vocab 512, 256 positions) with a byte-level tokenizer that adds
    no bos (so texts start from its eos, as lm-eval's)."""
    path = write_checkpoint("llama31", tmp_path_factory.mktemp("eval_llama"), vocab_size=512)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def hf(checkpoint):
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    from trtllm.runtime.llm import LLM

    with LLM(str(checkpoint), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=8192),
             build_config=BuildConfig(max_batch_size=16, max_num_tokens=512, max_seq_len=256)) as engine:
        yield engine


@pytest.fixture(scope="module")
def scorer(llm):
    from trtllm.eval.scorer import Scorer

    return Scorer(llm, group_tokens=512)  # several groups even for small tests


def hf_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """sum of log p(continuation | context) by one eager fp32 forward of HF's model."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    n = len(context)
    return sum(logp[n - 1 + i, t].item() for i, t in enumerate(continuation))

"""Online FP8 (QuantConfig's algorithms, quantized as the loader streams the bf16 demo
checkpoint): perplexity on the demo model's held-out sample within 1% of the unquantized
bf16 model's, each compiled by trtllm.compile and run on the ops' references (issue 20's
accuracy bar). The windows are trtllm.demo.perplexity's (seq_len + 1 tokens, overlapping by
one), its full ones: 1,280 of the sample's 1,382 tokens scored."""
import math

import pytest
import torch
from transformers import AutoTokenizer

import trtllm
from trtllm.config import QuantAlgo
from trtllm.demo import DEMO_MODEL_DIR, HELDOUT_SAMPLE, demo_model_path, pack, read_entries
from trtllm.quantization import fp8_linears_of

SEQ_LEN = 256


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # 1,382 tokens through 6 layers: the references


@pytest.fixture(scope="module")
def heldout_ids():
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_path()), local_files_only=True)
    return torch.tensor(pack(tokenizer, read_entries(DEMO_MODEL_DIR / HELDOUT_SAMPLE)))


def compiled_perplexity(compiled, ids: torch.Tensor) -> float:
    """Over the sample's full windows, all in one whole-sequence call [windows, SEQ_LEN]."""
    windows = torch.stack([ids[i: i + SEQ_LEN + 1] for i in range(0, ids.numel() - SEQ_LEN - 1, SEQ_LEN)])
    x, y = windows[:, :-1], windows[:, 1:]
    logits = compiled(x, torch.arange(SEQ_LEN).expand_as(x)).float()
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())


@pytest.fixture(scope="module")
def bf16_perplexity(heldout_ids):
    model = trtllm.load_model(demo_model_path(), dtype=torch.bfloat16, device="cpu")
    with pytest.MonkeyPatch.context() as mp:  # module scope: set before the autouse fixture runs
        mp.setenv("TRITON_INTERPRET", "0")
        return compiled_perplexity(trtllm.compile(model), heldout_ids)


@pytest.mark.parametrize("algo", [QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.FP8_BLOCK_SCALES])
def test_fp8_perplexity_within_one_percent_of_bf16(algo, heldout_ids, bf16_perplexity):
    model = trtllm.load_model(demo_model_path(), dtype=torch.bfloat16, device="cpu", quant_algo=algo)
    assert len(fp8_linears_of(model).linears) == 6 * 7  # every decoder linear; the (tied) head stays bf16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compiled = trtllm.compile(model)
    ppl = compiled_perplexity(compiled, heldout_ids)
    assert "trtllm.fp8_gemm" in compiled.summary()
    assert abs(ppl / bf16_perplexity - 1) < 0.01, (algo.value, ppl, bf16_perplexity)

"""kernels/top_k_top_p on a GPU (skipped without one): the compiled kernel keeps the tokens the
rule keeps, at Llama-3's vocabulary, and the sampler's filtered path on the device draws the
CPU reference's tokens."""
import os

import pytest
import torch

from tests.kernels.test_top_k_top_p import _clear_top_p, _expected
from trtllm.kernels.top_k_top_p import top_k_top_p, top_k_top_p_ref
from trtllm.runtime.sampler import Sampler, SamplingBatch
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("ties", [False, True], ids=["fp32", "bf16-ties"])
@pytest.mark.parametrize("n,v", [(1, 128256), (16, 128256), (5, 5125)])
def test_kernel_keeps_what_the_rule_keeps_on_the_device(n, v, ties):
    g = torch.Generator().manual_seed(n + v)
    x = torch.randn(n, v, generator=g) * 4
    if ties:
        x = x.bfloat16().float()
    top_k = torch.tensor([v if i % 4 in (0, 2) else 1 + 37 * i for i in range(n)])
    top_p = torch.tensor([_clear_top_p(x[i], int(top_k[i]), g) if i % 4 in (2, 3) else 1.0 for i in range(n)],
                         dtype=torch.float32)
    got = top_k_top_p(x.cuda(), top_k.cuda(), top_p.cuda()).cpu()
    for i in range(n):
        mask = _expected(x[i], int(top_k[i]), float(top_p[i]))
        assert torch.equal(got[i].isfinite(), mask), (i, int(top_k[i]), float(top_p[i]))
        assert torch.equal(got[i][mask], x[i][mask])
    assert torch.equal(top_k_top_p_ref(x.cuda(), top_k.cuda(), top_p.cuda()).cpu().isfinite(), got.isfinite())


def test_the_filtered_sampler_draws_the_cpu_references_tokens():
    v = 128256
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=8) for i in range(6)] + \
             [SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=9, max_tokens=8)]
    seqs = [Sequence(f"r{i}", [1, 2, 3], p) for i, p in enumerate(params)]
    logits = torch.randn(len(seqs), v, generator=torch.Generator().manual_seed(5)) * 3
    on_gpu = Sampler()(logits.cuda(), SamplingBatch.build(seqs, v, "cuda", [2]))
    on_cpu = Sampler()(logits, SamplingBatch.build(seqs, v, "cpu", [2]))
    assert on_gpu.token_ids.tolist() == on_cpu.token_ids.tolist()
    torch.testing.assert_close(on_gpu.logprobs.cpu(), on_cpu.logprobs, atol=1e-4, rtol=1e-4)

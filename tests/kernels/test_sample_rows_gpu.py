"""kernels/sample_rows on a GPU (skipped without one): the compiled kernel against the torch
reference on the device, at Llama-3's vocabulary. The noise uses libdevice's logf, torch.log's
own, so the tokens are the reference's exactly, not only near-ties apart."""
import os

import pytest
import torch

from trtllm.kernels.sample_rows import sample_rows, sample_rows_ref
from trtllm.runtime.sampler import Sampler, SamplingBatch
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,v", [(1, 128256), (64, 128256), (7, 5125), (3, 4097)])
def test_kernel_is_the_reference_on_the_device(n, v, dtype):
    g = torch.Generator(device="cuda").manual_seed(n + v)
    logits = (torch.randn(n, v, generator=g, device="cuda") * 4).to(dtype)
    greedy = torch.arange(n, device="cuda") % 3 == 0
    temperature = torch.where(greedy, 1.0, torch.rand(n, generator=g, device="cuda") + 0.3)
    seed = torch.randint(0, 2**62, (n,), generator=g, device="cuda")
    index = torch.randint(0, 4, (n,), generator=g, device="cuda")
    step = torch.randint(0, 4000, (n,), generator=g, device="cuda")
    if n > 2:
        logits[1, 5] = float("nan")
        logits[2] = float("-inf")
    operands = (logits, temperature, greedy, seed, index, step)
    tok, lp, fin = sample_rows(*operands)
    rtok, rlp, rfin = sample_rows_ref(*operands)
    assert torch.equal(fin, rfin)
    assert torch.equal(tok[fin], rtok[fin])
    torch.testing.assert_close(lp[fin], rlp[fin], atol=1e-4, rtol=1e-5)


def test_sampler_plain_and_filtered_paths_agree():
    # temperature alone takes the one-pass path; top_p = 1 - 1e-9 forces the filtered path
    # without changing the distribution: the same seeds must draw the same tokens
    v, n = 128256, 16
    logits = torch.randn(n, v, device="cuda").bfloat16()
    seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(temperature=0.7, seed=i, max_tokens=4), seed=i) for i in range(n)]
    plain = SamplingBatch.build(seqs, v, "cuda", [2])
    assert plain.plain
    filt = [Sequence(f"r{i}", [1, 2], SamplingParams(temperature=0.7, top_k=v, min_p=1e-30, seed=i, max_tokens=4),
                     seed=i) for i in range(n)]
    filtered = SamplingBatch.build(filt, v, "cuda", [2])
    assert not filtered.plain
    a, b = Sampler()(logits, plain), Sampler()(logits, filtered)
    assert torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-5)

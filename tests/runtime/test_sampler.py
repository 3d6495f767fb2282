import math

import pytest
import torch

from trtllm.kernels.sample_rows import gumbel_noise_ref, open_unit
from trtllm.runtime.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    draw_seed,
    process_logits,
)
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

EOS = 3
sampler = Sampler()


def make_seq(prompt=(1, 2), out=(), seed=0, index=0, **params):
    return Sequence("r", list(prompt), SamplingParams(max_tokens=64, **params), index=index,
                    output_token_ids=list(out), seed=seed)


def build(seqs, V):
    return SamplingBatch.build(seqs, V, "cpu", [EOS])


def sample_many(logits_row, n, **params):
    """n rows with the same logits and seeds 0..n-1."""
    sp = SamplingParams(**params)  # shared: building 20k pydantic models is the slow part
    seqs = [Sequence("r", [1, 2], sp, seed=s) for s in range(n)]
    return sampler(logits_row.expand(n, -1).contiguous(), build(seqs, logits_row.numel()))


def test_greedy_is_argmax_any_dtype():
    logits = torch.randn(6, 100)
    seqs = [make_seq(temperature=0.0, seed=i) for i in range(3)] + \
           [make_seq(top_k=1, temperature=1.5, seed=i) for i in range(3)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = sampler(logits.to(dtype), build(seqs, 100))
        assert out.token_ids.dtype == torch.int64
        assert torch.equal(out.token_ids, logits.to(dtype).float().argmax(-1))
        assert out.finite.all()


def test_top_k_restricts_support():
    logits = torch.randn(50)
    out = sample_many(logits, 2000, top_k=5)
    top5 = set(logits.topk(5).indices.tolist())
    assert set(out.token_ids.tolist()) == top5  # within the set, and all of it reachable


def test_top_p_and_min_p_restrict_support():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log()
    # top_p 0.75: mass above token 2 is 0.7 < 0.75 (kept), above token 3 is 0.85
    assert set(sample_many(logits, 2000, top_p=0.75).token_ids.tolist()) == {0, 1, 2}
    # min_p 0.35: keep p >= 0.175
    assert set(sample_many(logits, 2000, min_p=0.35).token_ids.tolist()) == {0, 1}
    # tiny top_p: always at least the top token
    assert set(sample_many(logits, 200, top_p=0.01).token_ids.tolist()) == {0}
    # top-p applies to the renormalised top-k distribution: k=2 → {0.714, 0.286}
    assert set(sample_many(logits, 2000, top_k=2, top_p=0.7).token_ids.tolist()) == {0}
    assert set(sample_many(logits, 2000, top_k=2, top_p=0.75).token_ids.tolist()) == {0, 1}


def test_masks_directly():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    b = build([make_seq(top_k=2)], 5)
    assert apply_top_k_top_p(logits, b).isfinite().tolist() == [[False, True, False, True, False]]
    b = build([make_seq(min_p=math.exp(-1.5))], 5)  # keep logit >= 3 - 1.5
    assert apply_min_p(logits, b).isfinite().tolist() == [[False, True, False, True, False]]
    b = build([make_seq()], 5)  # neutral: exact identity
    assert torch.equal(process_logits(logits, b), logits)


def test_penalties_change_exactly_the_right_logits():
    V = 8
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, 0.0, 3.0, 4.0]] * 3)
    seqs = [make_seq(prompt=[0, 1], out=[2, 3, 3], repetition_penalty=2.0),
            make_seq(prompt=[0, 1], out=[2, 3, 3, 4], presence_penalty=0.5,
                     frequency_penalty=0.25),
            make_seq(prompt=[0, 1], out=[2, 3])]  # no penalty: untouched
    got = apply_penalties(logits, build(seqs, V))
    want = logits.clone()
    want[0, [0, 2]] /= 2.0          # positive: divided
    want[0, [1, 3]] *= 2.0          # negative: multiplied (prompt tokens count too)
    want[1, 2] -= 0.5 + 0.25        # presence + 1 * frequency; prompt tokens don't count
    want[1, 3] -= 0.5 + 0.5
    want[1, 4] -= 0.5 + 0.25
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_min_tokens_masks_eos_and_stop_ids():
    V = 10
    logits = torch.zeros(3, V)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0
    seqs = [make_seq(out=[5], min_tokens=3, stop_token_ids=[7], temperature=0.0),
            make_seq(out=[5, 5, 5], min_tokens=3, stop_token_ids=[7], temperature=0.0),
            make_seq(out=[5], min_tokens=3, stop_token_ids=[7, 99])]  # out-of-vocab id ignored
    b = build(seqs, V)
    masked = apply_min_tokens(logits, b)
    assert masked[0, EOS] == masked[0, 7] == masked[2, EOS] == masked[2, 7] == float("-inf")
    assert masked[1].isfinite().all() and masked.isfinite().sum() == 3 * V - 4
    out = sampler(logits, b)
    assert out.token_ids[0] != EOS and out.token_ids[1] == EOS
    assert out.token_ids[2] not in (EOS, 7)
    # under ignore_eos the EOS ends nothing, so min_tokens leaves it alone (vLLM's and TensorRT-LLM's rule;
    # it was masked, changing what a greedy request picked)
    ignoring = [make_seq(out=[5], min_tokens=3, stop_token_ids=[7], temperature=0.0, ignore_eos=True)]
    masked = apply_min_tokens(logits[:1].clone(), build(ignoring, V))
    assert masked[0, EOS] == 10.0 and masked[0, 7] == float("-inf")
    assert sampler(logits[:1].clone(), build(ignoring, V)).token_ids[0] == EOS


def test_same_seed_same_tokens_regardless_of_batch():
    V = 1000
    row = torch.randn(V) * 0.1  # flat: the noise decides
    mine = [make_seq(seed=s, out=[1] * (s % 7), temperature=0.9, top_p=0.95)
            for s in (5, 77, 2**62)]
    alone = [sampler(row[None], build([s], V)).token_ids.item() for s in mine]
    others = [make_seq(seed=100 + i, repetition_penalty=1.3, top_k=7) for i in range(5)] + \
             [make_seq(temperature=0.0), make_seq(min_p=0.2, logprobs=3)]
    batch = others[:3] + mine[:1] + others[3:] + mine[1:]
    where = [batch.index(s) for s in mine]
    logits = torch.randn(len(batch), V)
    logits[where] = row
    out = sampler(logits, build(batch, V))
    assert out.token_ids[where].tolist() == alone


def test_different_seeds_steps_and_indices_differ():
    V = 1000
    uniform = torch.zeros(V)
    assert len(set(sample_many(uniform, 200, temperature=1.0).token_ids.tolist())) > 150
    by_step = [make_seq(seed=1, out=[0] * k, temperature=1.0) for k in range(200)]
    assert len(set(sampler(torch.zeros(200, V), build(by_step, V)).token_ids.tolist())) > 150
    by_index = [make_seq(seed=1, index=k, temperature=1.0) for k in range(200)]  # n > 1 with one seed
    assert len(set(sampler(torch.zeros(200, V), build(by_index, V)).token_ids.tolist())) > 150
    assert draw_seed() != draw_seed() and 0 <= draw_seed() < 2**63


def test_noise_is_uniform_gumbel():
    b = build([make_seq(seed=s) for s in range(20)], 5000)
    g = gumbel_noise_ref(b.seed, b.index, b.step, b.vocab_size).flatten()
    assert g.isfinite().all()
    u = torch.exp(-torch.exp(-g))  # back to uniform
    hist = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert (hist / u.numel() - 0.05).abs().max() < 0.003
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni


def test_noise_is_finite_at_the_hashes_extremes():
    """The largest hash once made u = 1.0 and +inf noise, which beat any -inf mask (a grammar's
    refused token sampled: test_grammar's batch-mates test failed one run in ~200 under load)."""
    u = open_unit(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1]))
    assert ((u > 0) & (u < 1)).all()
    g = -torch.log(-torch.log(u))
    assert g.isfinite().all()
    masked = torch.tensor([float("-inf"), 0.0]) + g[-2:]  # a masked token against an allowed one
    assert masked.argmax() == 1


def test_frequencies_match_softmax():
    n = 20000
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    for temperature in (1.0, 0.5):
        out = sample_many(probs.log() * temperature, n, temperature=temperature)
        counts = torch.bincount(out.token_ids, minlength=5).double()
        expected = probs.double() * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 25.0, (counts, chi2)  # 4 dof: p ~ 1e-4


def test_bad_rows_fail_alone():
    V = 50
    logits = torch.randn(5, V)
    seqs = [make_seq(seed=i, logprobs=2) for i in range(5)]
    good = sampler(logits, build(seqs, V))
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[2, 3] = float("inf")
    bad[3] = float("-inf")
    bad[4, :10] = float("-inf")  # partial -inf is a legitimate mask
    out = sampler(bad, build(seqs, V))
    assert out.finite.tolist() == [True, False, False, False, True]
    assert out.token_ids[0] == good.token_ids[0] and out.token_ids[4] >= 10
    assert out.logprobs[0] == good.logprobs[0]
    assert out.logprobs.isfinite().all() and out.top_logprobs[1].isfinite().all()


def test_logprobs_are_those_of_the_processed_distribution():
    V = 40
    logits = torch.randn(4, V)
    seqs = [make_seq(seed=1, temperature=0.7, top_k=10, logprobs=5),
            make_seq(seed=2, temperature=0.0, logprobs=2, out=[4], repetition_penalty=1.5),
            make_seq(seed=3, top_p=0.5),  # asked for none
            make_seq(seed=4, min_p=0.1, logprobs=0)]
    b = build(seqs, V)
    out = sampler(logits, b)
    ref = process_logits(logits, b).log_softmax(-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (4, 5)  # K = max requested
    torch.testing.assert_close(values, ref.topk(5).values)
    torch.testing.assert_close(ref.gather(1, ids), values)
    # no row asked for top logprobs: None, and the chosen logprob still right
    b = build([make_seq(seed=1, temperature=0.7), make_seq(logprobs=0)], V)
    out = sampler(logits[:2], b)
    assert out.top_logprobs is None
    ref = process_logits(logits[:2], b).log_softmax(-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])


def test_mixed_batch_matches_rows_alone():
    V = 64
    logits = torch.randn(6, V) * 3
    seqs = [make_seq(temperature=0.0),
            make_seq(seed=9, temperature=1.3),
            make_seq(seed=8, out=[5, 5, 6], repetition_penalty=1.2, frequency_penalty=0.5,
                     presence_penalty=-0.3, top_k=20, logprobs=4),
            make_seq(top_k=1, out=[int(logits[3].argmax())], repetition_penalty=100.0),
            make_seq(seed=7, top_p=0.9, min_p=0.05, min_tokens=5, out=[1]),
            make_seq(seed=6, temperature=0.01)]
    out = sampler(logits, build(seqs, V))
    assert out.token_ids[0] == logits[0].argmax()
    assert out.token_ids[3] != logits[3].argmax()  # penalty pushed the old argmax down
    assert out.token_ids[4] != EOS
    for i, s in enumerate(seqs):
        alone = sampler(logits[i:i + 1], build([s], V))
        assert alone.token_ids.item() == out.token_ids[i].item()
        torch.testing.assert_close(alone.logprobs[0], out.logprobs[i])


def test_empty_batch():
    out = sampler(torch.zeros(0, 10), build([], 10))
    assert out.token_ids.shape == (0,) and out.top_logprobs is None


@pytest.mark.parametrize("V", [1, 2])
def test_tiny_vocab(V):
    out = sample_many(torch.zeros(V), 100, top_k=5, top_p=0.5)
    assert out.token_ids.max() < V


def test_shape_mismatch_and_params_replacement():
    s = make_seq(temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        sampler(torch.zeros(2, 10), build([s], 10))
    logits = torch.arange(10.0)[None]
    assert sampler(logits, build([s], 10)).token_ids.item() == 9
    s.sampling_params = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[9])
    assert sampler(logits, build([s], 10)).token_ids.item() == 8  # the cached row is redone


@pytest.mark.parametrize("vocab", [7, 300, 1000, 128256])
def test_greedy_picks_are_argmax_and_the_samplers_finite_rule(vocab):
    from trtllm.runtime.sampler import _finite_rows, greedy_picks
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=g)
    logits[1, vocab // 3] = logits[1, vocab - 1] = 50.0  # a tie: the first one wins
    logits[2, vocab // 2] = float("nan")
    logits[3, 0] = float("inf")
    logits[4] = float("-inf")                              # no finite logit
    logits[5, : vocab // 2] = float("-inf")                # masked tokens: fine
    logits[6, vocab - 1] = float("-inf")
    picks = greedy_picks(logits)
    sound = _finite_rows(logits)
    assert picks[1].tolist() == sound.long().tolist() == [1, 1, 0, 0, 0, 1, 1, 1]
    assert picks[0, 1].item() == vocab // 3
    assert picks[0][sound].tolist() == logits.argmax(-1)[sound].tolist()


def test_the_engine_queues_the_sampler_before_it_waits_for_the_step(monkeypatch):
    """A step without logits hooks gets its sampler launched before the engine waits for the
    step's kernels (on a GPU they queue behind them, no idle launch gap after the step); one with
    a logits processor (which may read the logits on the host) waits first. Tokens unchanged."""
    import transformers

    from trtllm.config import KvCacheConfig
    from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
    from trtllm.runtime.launched_step import LaunchedStep
    from trtllm.runtime.llm import LLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_hf(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256))).eval()
    order = []
    wait = LaunchedStep.wait
    monkeypatch.setattr(LaunchedStep, "wait", lambda self: (order.append("wait"), wait(self))[1])
    with LLM(model, kv_cache_config=KvCacheConfig(max_tokens=1024)) as llm:
        sample = llm.engine.step_sampler.sampler
        llm.engine.step_sampler.sampler = lambda logits, batch: (order.append("sample"), sample(logits, batch))[1]
        params = SamplingParams(max_tokens=3, temperature=0.8, seed=7, ignore_eos=True)
        first = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
        assert order == ["sample", "wait"] * 3, order
        order.clear()

        def keep(req_id, logits, token_ids, stream_ptr, client_id):  # edits nothing
            pass

        hooked = SamplingParams(max_tokens=3, temperature=0.8, seed=7, ignore_eos=True, logits_processor=keep)
        again = llm.generate([[5, 6, 7]], hooked, use_tqdm=False)[0].outputs[0].token_ids
        assert order == ["wait", "sample"] * 3, order
        assert again == first

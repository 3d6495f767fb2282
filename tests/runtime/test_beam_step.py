"""The beam step's batched pieces (issue 23): `select_beams` equals the per-group search
arithmetic it replaced (equal candidates in flat-index order); a decode-graph step of beams (and greedy rows) runs no sampler, and the
search still equals HF's and the greedy tokens a run alone's (decode graphs stood in for on the
CPU by the model run eagerly); a copy-on-write block of a beam that keeps its table reaches the
attention metadata."""
import numpy as np
import pytest
import torch

from tests.runtime.test_beams import CASES, PROMPTS, beam_params, check_against_hf, checkpoint, engine_of, hf, run  # noqa: F401
from trtllm.attention_context import AttentionMetadata, attention_context
from trtllm.runtime.beam_search import select_beams
from trtllm.runtime.beams import graph_picks_serve
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.sampler import greedy_picks
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams


def per_group_reference(logits, index, scores, keep, masked):
    """beams.py's search arithmetic before select_beams: log_softmax of the step's rows, then
    per group its k rows, the min_tokens mask, + scores, top-k."""
    logp = logits.float().log_softmax(-1)
    G, k = scores.shape
    values, flat = [], []
    for g in range(G):
        rows = logp[index[g * k:(g + 1) * k]].clone()
        for gi, t in masked or ():
            if gi == g:
                rows[:, t] = float("-inf")
        v, i = torch.topk((rows + scores[g][:, None]).view(-1), keep)
        order = np.lexsort((i.numpy(), -v.numpy()))  # ties: torch.topk's order is its own; lower index first
        values.append(v.numpy()[order])
        flat.append(i.numpy()[order])
    return np.stack(values), np.stack(flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_beams_equals_the_per_group_search(dtype):
    g = torch.Generator().manual_seed(0)
    G, k, V = 3, 4, 97
    logits = (torch.randn(G * k + 2, V, generator=g) * 4).to(dtype)
    index = torch.randperm(G * k + 2, generator=g)[:G * k]
    index[:k] = index[0]  # a group at its first step: the leader's row k times
    scores = torch.randn(G, k, generator=g) * 3
    scores[0, 1:] = -1.0e9
    masked = [(1, 5), (1, 50), (2, 96)]
    for m in (None, masked):
        values, flat = select_beams(logits, index, scores, 2 * k, m)
        want_v, want_i = per_group_reference(logits, index, scores, 2 * k, m)
        assert values.dtype == np.float32 and flat.shape == (G, 2 * k)
        np.testing.assert_array_equal(values, want_v)
        np.testing.assert_array_equal(flat, want_i)
        if dtype == torch.bfloat16:  # equal candidates come in flat-index order (bf16 logits tie: here they do)
            assert any(len(set(row)) < len(row) for row in values.tolist())
    assert (flat[0] // V == 0).all(), "at the first step only the leader's continuations count"
    assert not np.isin(flat[1] % V, [5, 50]).any() and not (flat[2] % V == 96).any()


def test_select_beams_refuses_an_index_that_does_not_match_the_scores():
    with pytest.raises(ValueError, match="one row per beam"):
        select_beams(torch.zeros(8, 16), torch.arange(6), torch.zeros(2, 4), 8)
    with pytest.raises(ValueError, match=r"logits \(6, 16\) does not match .* one row per beam"):
        select_beams(torch.zeros(6, 16), None, torch.zeros(2, 4), 8)


def test_select_beams_without_an_index_takes_the_rows_in_order():
    """index None (every row a beam, in order: step_groups' usual case) skips the gather: the
    same values and indices as the identity index, values' fp32 bits intact through the one copy."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 97, generator=g) * 4).to(torch.bfloat16)
    scores = torch.randn(2, 4, generator=g) * 3
    values, flat = select_beams(logits, None, scores, 8)
    want_v, want_i = select_beams(logits, torch.arange(8), scores, 8)
    np.testing.assert_array_equal(values, want_v)
    np.testing.assert_array_equal(flat, want_i)
    ref_v, ref_i = per_group_reference(logits, torch.arange(8), scores, 8, None)
    np.testing.assert_array_equal(values, ref_v)
    np.testing.assert_array_equal(flat, ref_i)


def test_graph_picks_serve_beams_and_greedy_rows_only():
    group = object()
    beam, greedy = SamplingParams(beam_width=2), SamplingParams(temperature=0.0)

    def seq(params, in_group=True, guide=None):
        s = Sequence("r", [1, 2], params)
        s.beam, s.guide = group if in_group else None, guide
        return s

    assert graph_picks_serve([seq(beam), seq(beam)])
    assert graph_picks_serve([seq(beam), seq(greedy, in_group=False)])
    assert not graph_picks_serve([])
    assert not graph_picks_serve([seq(greedy, in_group=False)]), "no beams: the engine's own rule decides"
    assert not graph_picks_serve([seq(beam), seq(SamplingParams(temperature=0.8), in_group=False)])
    assert not graph_picks_serve([seq(beam), seq(SamplingParams(temperature=0.0, logprobs=2), in_group=False)])
    assert not graph_picks_serve([seq(beam), seq(greedy, in_group=False, guide=object())])
    assert not graph_picks_serve([seq(SamplingParams(beam_width=2, return_generation_logits=True))])


class _EagerDecodeGraph:
    """A decode graph's stand-in on the CPU: replay() runs the model on the runner's inputs
    and metadata (what the captured graph computes) into the graph's logits and picks."""

    def __init__(self, runner, size: int, logits, picks):
        self.runner, self.size, self.logits, self.picks = runner, size, logits, picks

    def replay(self) -> None:
        r = self.runner
        with attention_context(r.cache, r.meta):
            out = r.compiled(*r._flat_batch(self.size))[0]
        self.logits.copy_(out)
        self.picks.copy_(greedy_picks(out))


class _CountingSampler:
    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def __call__(self, logits, batch):
        self.calls.append(logits.shape[0])
        return self.sampler(logits, batch)


def eager_graphs(engine):
    runner, vocab = engine.runner, engine.vocab_size
    for b in range(1, 17):  # every size: a step's batch is never padded (the stand-in has no padding rows)
        logits, picks = torch.zeros(b, vocab), torch.zeros(2, b, dtype=torch.long)
        runner.cuda_graphs.decode[b] = (_EagerDecodeGraph(runner, b, logits, picks), logits, picks)
    engine.step_sampler.sampler = counting = _CountingSampler(engine.step_sampler.sampler)
    return counting


def test_a_graph_step_of_beams_alone_runs_no_sampler_and_equals_hf(checkpoint, hf):  # noqa: F811
    engine = engine_of(checkpoint)
    counting = eager_graphs(engine)
    for case in CASES:  # one case at a time: its groups fit the batch and prefill in one step
        requests = {str(j): (p, beam_params(case)) for j, p in enumerate(PROMPTS)}
        done = run(engine, requests)
        for rid, (prompt, _) in requests.items():
            check_against_hf(hf, done[rid], prompt, case)
    # each case: one prefill step samples the 3 leaders' first rows; no decode step samples
    assert counting.calls == [3] * len(CASES), f"the sampler ran on decode steps: {counting.calls}"
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0


def test_a_graph_step_queues_the_search_before_its_wait(checkpoint, hf, monkeypatch):  # noqa: F811
    """After a decode-graph step the search's device work is queued before the host waits
    (beam_search.queue_search) and step_groups reads that result; the prefill step (no graph)
    searches after it, as before. The output is HF's either way."""
    from trtllm.runtime import beam_search
    launches, reads = [], []
    launch, read = beam_search._launch_select, beam_search.QueuedSearch.read
    monkeypatch.setattr(beam_search, "_launch_select", lambda *a: (launches.append(1), launch(*a))[1])
    monkeypatch.setattr(beam_search.QueuedSearch, "read", lambda q: (reads.append(1), read(q))[1])
    engine = engine_of(checkpoint)
    eager_graphs(engine)
    requests = {str(j): (p, beam_params(CASES[0])) for j, p in enumerate(PROMPTS)}
    done = run(engine, requests)
    for rid, (prompt, _) in requests.items():
        check_against_hf(hf, done[rid], prompt, CASES[0])
    assert reads and len(launches) == len(reads) + 1  # every search but the prefill step's was queued


def test_greedy_rows_beside_beams_take_the_graph_picks_and_equal_a_run_alone(checkpoint, hf):  # noqa: F811
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = run(engine_of(checkpoint), {"g": (PROMPTS[0], greedy)})
    engine = engine_of(checkpoint)
    counting = eager_graphs(engine)
    mixed = run(engine, {"b": (PROMPTS[2], beam_params(CASES[0])), "g": (PROMPTS[0], greedy)})
    assert mixed["g"].outputs[0].token_ids == alone["g"].outputs[0].token_ids
    check_against_hf(hf, mixed["b"], PROMPTS[2], CASES[0])
    assert counting.calls == [2], f"the sampler ran on decode steps: {counting.calls}"


def test_a_copy_on_write_of_a_beam_that_keeps_its_table_reaches_the_metadata():
    bm = BlockManager(8, 4, enable_block_reuse=False)
    meta = AttentionMetadata(16, 4, 4, torch.device("cpu"))
    params = SamplingParams()
    a, b = Sequence("r", [1, 2, 3, 4, 5, 6], params), Sequence("r", [1, 2, 3, 4, 5, 6], params)
    bm.allocate(a)
    a.num_computed_tokens = 6
    bm.fork([b], [a])  # b takes a's blocks; a keeps its own table (list) as it is
    meta.fill([1], [7], [a.block_table], 4)
    shared = a.block_table[1]
    assert bm.try_append(a, 1) and a.block_table[1] != shared  # a writes its partial block: a copy first
    meta.fill([1], [7], [a.block_table], 4)
    assert meta.block_tables[0, :2].tolist() == a.block_table[:2]

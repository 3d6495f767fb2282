"""The overlap scheduler on CPU, through the CUDA-graph stand-ins of test_model_runner:
the next decode step is launched (its input ids gathered from the previous step's picks,
or from its sampler's output) before the previous step's bookkeeping. Outputs must equal those of the
plain engine whatever ends a sequence (max_tokens, a stop token mid-run, max_seq_len,
abort, preemption), and no block may leak."""
import pytest

from tests.runtime.test_model_runner import PROMPTS, make_llm
from trtllm.sampling_params import SamplingParams


def count_ahead(llm) -> list:
    """Wrap the runner's execute_ahead; the list gets one entry per launch it made."""
    runner, launched = llm.engine.runner, []
    real = runner.execute_ahead

    def counted(*args):
        step = real(*args)
        launched.append(step is not None)
        return step
    runner.execute_ahead = counted
    return launched


def run(checkpoint, params, overlap: bool, prompts=PROMPTS, **kw):
    with make_llm(checkpoint, graphs=True, overlap=overlap, **kw) as llm:
        launched = count_ahead(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_free_blocks + llm.block_manager.num_cached_blocks == llm.block_manager.num_blocks
        assert llm.engine._ahead is None
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], sum(launched)


def test_overlap_gives_the_plain_engines_tokens(checkpoint):
    # different max_tokens: sequences leave the batch at different steps, so steps
    # launched ahead shrink (rows gathered from the middle of the previous step)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (9, 3, 14, 1, 6)]
    plain, none_ahead = run(checkpoint, params, overlap=False)
    over, ahead = run(checkpoint, params, overlap=True)
    assert none_ahead == 0 and ahead >= 8  # most decode steps were launched ahead
    assert over == plain


def test_a_stop_token_mid_run_drops_the_row_launched_ahead(checkpoint):
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain, _ = run(checkpoint, free, overlap=False)
    # stop each sequence at the token it makes 4th (so with one more launched ahead of it)
    stops = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[tokens[3]])
             for tokens, _ in plain]
    want, _ = run(checkpoint, stops, overlap=False)
    got, ahead = run(checkpoint, stops, overlap=True)
    assert ahead > 0 and got == want
    assert all(reason == "stop" and len(tokens) <= 4 for tokens, reason in got)


def test_overlap_at_max_seq_len_and_under_preemption(checkpoint):
    long = [list(range(1, 50)), list(range(200, 240))]  # 49 + 15 = max_seq_len 64
    params = SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True)
    plain, _ = run(checkpoint, params, overlap=False, prompts=long)
    over, ahead = run(checkpoint, params, overlap=True, prompts=long)
    assert ahead > 0 and over == plain
    # 8 blocks of 16 for 5 sequences growing to ~30 tokens: decodes run out of blocks
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    plain, _ = run(checkpoint, params, overlap=False, kv_tokens=128)
    over, ahead = run(checkpoint, params, overlap=True, kv_tokens=128)
    assert ahead > 0 and over == plain


def test_abort_with_a_step_in_flight_frees_everything(checkpoint):
    with make_llm(checkpoint, graphs=True, overlap=True) as llm:
        launched = count_ahead(llm)
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        stream = llm._submit(PROMPTS[0], params, streaming=True)
        for i, partial in enumerate(stream):  # noqa: B007 (the last one is checked below)
            if i == 5:
                llm.abort(stream.request_id)  # a step launched ahead is in flight by now
        assert partial.outputs[0].finish_reason == "abort" and len(partial.outputs[0].token_ids) < 40
        # the engine goes on serving, and the books balance
        out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 5 and sum(launched) > 0
        bm = llm.block_manager
        bm.check_invariants()
        assert bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1),
    SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=2, ignore_eos=True, logprobs=2),
    # each sees the tokens of the step before the one launched ahead: output counts, the last token
    SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True, repetition_penalty=1.5,
                   frequency_penalty=0.7, presence_penalty=0.4),
    SamplingParams(max_tokens=8, temperature=0.8, seed=4, min_tokens=5, no_repeat_ngram_size=2),
], ids=["logprobs", "sampled", "top_p", "penalties", "min_tokens"])
def test_rows_that_need_the_sampler_are_launched_ahead_from_its_tokens(checkpoint, params):
    """The sampler is queued behind the step and the next step gathers its input ids from the
    sampler's output on the device; tokens, logprobs and finish reasons are the plain engine's."""
    def logprobs_of(checkpoint, overlap):
        with make_llm(checkpoint, graphs=True, overlap=overlap) as llm:
            launched = count_ahead(llm)
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            llm.block_manager.check_invariants()
            assert llm.engine._ahead is None
            return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs) for o in outs], \
                sum(launched)

    plain, none_ahead = logprobs_of(checkpoint, overlap=False)
    over, ahead = logprobs_of(checkpoint, overlap=True)
    assert none_ahead == 0 and ahead >= 4
    assert over == plain


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True, return_generation_logits=True),
    SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True, n=1, best_of=2),
], ids=["generation_logits", "best_of"])
def test_rows_whose_logits_the_host_reads_are_never_launched_ahead(checkpoint, params):
    """The next replay of the decode graph overwrites its logits: a row the host reads them for
    keeps the step an ordinary one."""
    plain, _ = run(checkpoint, params, overlap=False)
    over, ahead = run(checkpoint, params, overlap=True)
    assert ahead == 0 and over == plain


def test_a_full_batch_goes_on_ahead_while_others_wait(checkpoint):
    """More requests than max_batch_size: while the batch stays full, the waiting ones
    cannot be admitted, so steps are still launched ahead; outputs stay the same."""
    prompts = PROMPTS + [[11, 12, 13], list(range(30, 45)), [99] * 5]  # 8 requests, 4 slots
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    plain, _ = run(checkpoint, params, overlap=False, prompts=prompts, max_batch_size=4)
    over, ahead = run(checkpoint, params, overlap=True, prompts=prompts, max_batch_size=4)
    assert over == plain
    assert ahead >= 10  # both waves: the first while four requests wait

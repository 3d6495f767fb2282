"""Speculative decoding (runtime/speculative): proposers, accept/reject, and whole engines
whose greedy (and seeded n-gram) output is token-identical with speculation on and off,
under mixed batches, stop tokens and strings, streaming, max_tokens and preemption, with
the KV pools' books balanced after the rollbacks."""
import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import (
    DraftTargetDecodingConfig,
    EagleDecodingConfig,
    MTPDecodingConfig,
    NGramDecodingConfig,
    SpeculativeDecodingConfig,
)
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.runtime.speculative.ngram import propose_ngram
from trtllm.runtime.speculative.verify import greedy_accept, rejection_sample
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9], [7, 8, 9, 7, 8, 9, 7, 8]]


# -- proposers and accept / reject, alone ---------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2], 3, 2) == [3, 9, 1]
    assert propose_ngram([1, 2, 5, 6, 2], 2, 3) == [5, 6]              # only the 1-gram [2] occurred
    assert propose_ngram([4, 1, 2, 7, 1, 2, 8, 1, 2], 3, 2) == [8, 1, 2]  # the latest of two matches
    assert propose_ngram([1, 2, 3, 4], 3, 3) == []                      # nothing repeats
    # past the sequence's end the copy goes on from its own start: the period repeats
    assert propose_ngram([4, 1, 2, 7, 1, 2, 8, 1, 2], 5, 2) == [8, 1, 2, 8, 1]
    assert propose_ngram([7, 8, 7, 8, 7], 4, 3) == [8, 7, 8, 7]
    assert propose_ngram([3, 3], 5, 2) == [3, 3, 3, 3, 3]
    assert propose_ngram([5], 3, 2) == []


def _propose_ngram_by_windows(tokens, max_draft_len, max_ngram):
    """The lookup as first written: every window of n tokens compared, n from the largest."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        hits = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[len(tokens) - n:]]
        if hits and max_draft_len > 0:
            extended = list(tokens)
            for i in range(max_draft_len):
                extended.append(extended[hits[-1] + n + i])
            return extended[len(tokens):]
    return []


def test_ngram_lookup_matches_the_window_by_window_definition():
    import random
    r = random.Random(0)
    for _ in range(3000):
        tokens = [r.randrange(r.randint(1, 4)) for _ in range(r.randint(0, 24))]
        k, n = r.randint(0, 6), r.randint(1, 5)
        assert propose_ngram(tokens, k, n) == _propose_ngram_by_windows(tokens, k, n), (tokens, k, n)


def test_greedy_accept_takes_the_matching_prefix_then_the_target_token():
    assert greedy_accept([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]  # all accepted + the bonus
    assert greedy_accept([1, 2, 3], [1, 5, 3, 4]) == [1, 5]        # rejected at 1: the target's token
    assert greedy_accept([1, 2, 3], [6, 2, 3, 4]) == [6]
    assert greedy_accept([], [7]) == [7]
    with pytest.raises(ValueError, match="need one more"):
        greedy_accept([1, 2], [1, 2])


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_output_follows_the_target_distribution():
    """Draft tokens drawn from q, accepted/rejected against p: the first output token is
    distributed as p_0 and, after an accepted first draft, the second as p_1 (chi-square,
    4 degrees of freedom, 0.1% critical value 18.47). The draft's own distribution fails the
    same test, so the test can fail."""
    V, k, trials = 5, 2, 6000
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.2, 0.25, 0.4], [0.2] * 5])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.3, 0.2, 0.1, 0.1]])
    first, second = torch.zeros(V), torch.zeros(V)
    drafts = torch.stack([torch.multinomial(q[j], trials, replacement=True, generator=g) for j in range(k)], 1)
    for d in drafts.tolist():
        out = rejection_sample(p, q, d, g)
        assert 1 <= len(out) <= k + 1 and out[:len(out) - 1] == d[:len(out) - 1]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    critical = 18.47
    assert _chi_square(first, p[0]) < critical
    assert _chi_square(second, p[1]) < critical
    assert _chi_square(first, q[0]) > critical  # the test has the power to see a wrong distribution
    assert second.sum() > 1000  # enough accepted first drafts to test the second position


def test_rejection_sampling_with_equal_distributions_accepts_everything():
    p = torch.tensor([[0.25, 0.75], [0.6, 0.4], [0.5, 0.5]])
    g = torch.Generator().manual_seed(1)
    for d in ([0, 1], [1, 0], [1, 1]):
        assert rejection_sample(p, p[:2], d, g, bonus=1) == d + [1]


# -- whole engines ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    write_checkpoint("llama31", path, vocab_size=512)
    make_tokenizer(path)
    return path


def noisy_draft(target, scale=0.03):
    """The target's weights plus noise: a draft that agrees with the target often, not
    always (some steps accept part of their drafts and roll the rest back)."""
    from trtllm.models.loader import load_model
    draft = load_model(str(target), dtype="float32")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return draft


def small_llm(path, kv_tokens=4096, max_seq_len=64, **kw):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=kv_tokens),
               build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=max_seq_len), **kw)


def mixed_params(base_tokens, base_text):
    """A batch of differently-asked requests; a stop token and a stop string that the plain
    run reaches mid-way (inside a verify step's run, when the drafts are accepted)."""
    assert len(base_text) >= 8
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    stop_at = base_tokens[13]
    return [
        greedy,
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2),     # does not speculate
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                       stop=[base_text[len(base_text) // 2:len(base_text) // 2 + 2]], include_stop_str_in_output=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.2, min_tokens=4),
        SamplingParams(max_tokens=13, temperature=0.9, top_k=20, seed=7, ignore_eos=True, n=2),  # sampled
    ]


def run(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs], outs


@pytest.fixture(scope="module")
def plain(target):
    # module-scoped: set up before the function-scoped reference_ops fixture, so it sets the
    # same kernels (the torch references) itself: the interpreter's rounding differs
    with pytest.MonkeyPatch.context() as mp, small_llm(target) as llm:
        mp.setenv("TRITON_INTERPRET", "0")
        # prompt 2's greedy text turns periodic: n-gram lookup gets drafts accepted
        base = llm.generate(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        params = mixed_params(base.outputs[0].token_ids, base.outputs[0].text)
        prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[3], PROMPTS[4], PROMPTS[2], PROMPTS[0]]
        expected, _ = run(llm, prompts, params)
    return prompts, params, expected


def _configs(target):
    return {
        "ngram": NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2),
        "draft_self": DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(target)),
        "draft_noisy": DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir=noisy_draft(target)),
        # another random model (other seed, one layer): next to no draft token accepted
        "draft_random": DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir=write_checkpoint(
            "llama31", target.parent / "random_draft", seed=1, vocab_size=512, num_hidden_layers=1)),
    }


@pytest.mark.parametrize("kind", ["ngram", "draft_self", "draft_noisy", "draft_random"])
def test_mixed_batch_is_token_identical_with_speculation(target, plain, kind):
    prompts, params, expected = plain
    with small_llm(target, speculative_config=_configs(target)[kind]) as llm:
        got, outs = run(llm, prompts, params)
        stats = vars(llm.engine_stats())
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
        draft = llm.engine.speculative.draft
        if draft is not None:  # the draft model's own pool, every mirror freed
            draft.block_manager.check_invariants()
            assert draft.block_manager.num_used_blocks == 0 and not draft.mirrors
    sampled = len(params) - 1
    if kind == "ngram":  # exact match on the seeded sampler's own picks: identical sampled output too
        assert got == expected
    else:  # a sampled draft goes through rejection sampling: its own tokens, within the limits
        assert got[:sampled] == expected[:sampled]
        assert [len(c[0]) for c in got[sampled]] == [params[sampled].max_tokens] * 2
    assert got[2][0][2] == "stop" and got[3][0][2] == "stop"
    assert stats["spec_verify_steps"] > 0
    if kind != "draft_random":
        assert stats["spec_accepted_tokens"] > 0
    if kind == "draft_noisy":  # some steps accepted part of their drafts
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert outs[1].outputs[0].num_verify_steps == 0  # logprobs asked: no speculation
    first = outs[0].outputs[0]
    assert first.num_verify_steps > 0 and 1.0 <= first.acceptance_length <= 4.0
    if kind == "draft_self":  # the target as its own draft: every draft token accepted
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
        assert first.acceptance_length == 1 + first.num_accepted_draft_tokens / first.num_verify_steps
        assert first.num_accepted_draft_tokens == first.num_draft_tokens > 0


def test_streaming_delivers_several_tokens_a_step(target, plain):
    prompts, params, expected = plain
    cfg = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(target))
    with small_llm(target, speculative_config=cfg) as llm:
        diffs = [list(o.outputs[0].token_ids_diff) for o in llm.generate(prompts[0], params[0], streaming=True)]
    assert [t for d in diffs for t in d] == expected[0][0][0]
    assert max(len(d) for d in diffs) == 4  # three accepted drafts and the bonus in one output


@pytest.mark.parametrize("kind", ["ngram", "draft_self"])
def test_preemption_keeps_output_identical_and_books_balanced(target, kind):
    """3 blocks of 16 tokens for 4 sequences growing to 2 blocks each: sequences are
    preempted, and some steps have no room for drafts."""
    prompts = [PROMPTS[0] + [1, 2, 3], PROMPTS[4] + [5, 6], list(range(60, 72)), [9] * 3 + [4] * 8]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with small_llm(target, kv_tokens=48, max_seq_len=32) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.scheduler.num_preemptions > 0
    with small_llm(target, kv_tokens=48, max_seq_len=32, speculative_config=_configs(target)[kind]) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.scheduler.num_preemptions > 0
        assert vars(llm.engine_stats())["spec_verify_steps"] > 0
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
    assert got == expected


def test_a_draft_shorter_than_max_seq_len_drafts_up_to_its_own_length(target, plain, tmp_path):
    """GPT-2's learned position table ends at its max_position_embeddings (24 here, the target's
    max_seq_len 64): the draft proposes while its positions fit, then the target decodes alone
    (before: the draft's catch-up indexed past the table, an IndexError failing the request)."""
    prompts, params, expected = plain
    short = write_checkpoint("gpt2", tmp_path / "gpt2", vocab_size=512, max_position_embeddings=24)
    cfg = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(short))
    with small_llm(target, speculative_config=cfg) as llm:
        out = llm.generate(prompts[0], params[0]).outputs[0]
        draft = llm.engine.speculative.draft
        assert draft.max_positions == 24 and not draft.mirrors
        draft.block_manager.check_invariants()
    assert len(prompts[0]) == 21 and out.token_ids == expected[0][0][0]
    assert 0 < out.num_draft_tokens <= 3 + 3 + 2 + 1


def test_manual_spelling_with_a_module_draft(target):
    from trtllm.models.loader import load_model
    draft = load_model(str(target), dtype="float32")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = llm.generate(PROMPTS[2], params).outputs[0].token_ids
    cfg = SpeculativeDecodingConfig(draft_model=draft, draft_tokens=4)
    with small_llm(target, speculative_decoding_config=cfg) as llm:
        out = llm.generate(PROMPTS[2], params).outputs[0]
    assert out.token_ids == expected and out.num_accepted_draft_tokens == out.num_draft_tokens > 0


def test_mtp_on_a_target_without_mtp_layers_is_refused_by_name(target):
    """(EAGLE-3 heads: tests/runtime/test_eagle3.py; DeepSeek-V3's MTP: tests/runtime/test_mtp.py.)"""
    with pytest.raises(ValueError, match="MTP speculative decoding needs a DeepSeek-V3 checkpoint"):
        small_llm(target, speculative_config=MTPDecodingConfig(num_nextn_predict_layers=1))


def test_bad_speculative_configs_are_refused(target, tmp_path):
    cfg = NGramDecodingConfig()
    with pytest.raises(ValueError, match="not both"):
        small_llm(target, speculative_config=cfg, speculative_decoding_config=cfg)
    with pytest.raises(TypeError, match="speculative_config must be"):
        small_llm(target, speculative_config="ngram")
    with pytest.raises(ValueError, match="max_draft_len"):
        NGramDecodingConfig(max_draft_len=0)
    # TensorRT-LLM's pool options: False is what the lookup does; True is refused by name (was an unknown option)
    assert NGramDecodingConfig(is_keep_all=False, is_use_oldest=False, is_public_pool=False) == NGramDecodingConfig()
    for field, words in (("is_keep_all", "keeping every match of a pattern"), ("is_use_oldest", "the oldest match"),
                         ("is_public_pool", "a pool shared by requests")):
        with pytest.raises(ValueError, match=f"NGramDecodingConfig.{field}=True: {words} is not implemented"):
            NGramDecodingConfig(**{field: True})
    other_vocab = write_checkpoint("llama31", tmp_path / "v", vocab_size=256)
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(256 tokens\) differs from the target's \(512\)"):
        small_llm(target, speculative_config=DraftTargetDecodingConfig(speculative_model_dir=str(other_vocab)))
    with pytest.raises(FileNotFoundError, match=r"^the draft model \(speculative_model_dir\): .*'.*nowhere' does not"):
        small_llm(target, speculative_config=DraftTargetDecodingConfig(speculative_model_dir=str(tmp_path / "nowhere")))
    # not a path nor a module: named (before, str() of it was looked up, or os.fspath failed unnamed)
    for cfg in (DraftTargetDecodingConfig(speculative_model_dir=None), SpeculativeDecodingConfig(draft_model=3),
                EagleDecodingConfig(speculative_model_dir=3.5), MTPDecodingConfig(speculative_model_dir=[1])):
        field = "draft_model" if isinstance(cfg, SpeculativeDecodingConfig) else "speculative_model_dir"
        with pytest.raises(TypeError, match=rf"^{type(cfg).__name__}\.{field} must be .* \(a path\) or a \w+, got "):
            small_llm(target, speculative_config=cfg)
    # a corrupt draft checkpoint: named as the draft's (the target's path is fine)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^the draft model \(speculative_model_dir\): .*config.json: not valid JSON"):
        small_llm(target, speculative_config=DraftTargetDecodingConfig(speculative_model_dir=str(tmp_path / "corrupt")))
    with pytest.raises(NotADirectoryError, match=r"^the draft model \(speculative_model_dir\): .* is a file"):
        small_llm(target, speculative_config=DraftTargetDecodingConfig(speculative_model_dir=str(target / "config.json")))
    # the same vocabulary size, another tokenizer: its drafts would be other tokens (before: only the size was compared)
    other_tokens = write_checkpoint("llama31", tmp_path / "t", vocab_size=512)
    make_tokenizer(other_tokens, kind="metaspace")
    with pytest.raises(ValueError, match=r"^the draft model's tokenizer \(.*\) differs from the target's: '.*' is id "):
        small_llm(target, speculative_config=DraftTargetDecodingConfig(speculative_model_dir=str(other_tokens)))
    # a module that is not a language model: named as the draft's (before: the compile's or forward's error alone)
    encoder = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"^the draft model \(Linear\) is not a language model the engine can serve: "):
        small_llm(target, speculative_config=DraftTargetDecodingConfig(speculative_model_dir=encoder))


def test_trim_gives_rejected_draft_blocks_back_and_the_metadata_sees_the_new_table():
    """A verify step took blocks for its drafts; the rejected ones go back to the free list,
    and when the table regrows with another block the attention metadata's row follows."""
    from trtllm.attention_context import AttentionMetadata
    from trtllm.runtime.block_manager import BlockManager
    from trtllm.runtime.sequence import Sequence
    bm = BlockManager(8, 16)
    seq = Sequence("r", list(range(20)), SamplingParams())
    bm.allocate(seq)
    seq.num_computed_tokens = 19
    assert bm.try_append(seq, 1 + 14) and len(seq.block_table) == 3  # the last token + 14 drafts: 34 slots
    meta = AttentionMetadata(64, 4, 4, torch.device("cpu"))
    meta.fill([15], [34], [seq.block_table], 16)
    bm.trim(seq, 21)  # one draft accepted: 20 computed + the new token
    assert len(seq.block_table) == 2 and bm.num_used_blocks == 2 and bm.num_free_blocks == 6
    bm.check_invariants([seq])
    other = Sequence("o", [1] * 16, SamplingParams())
    bm.allocate(other)  # takes the freed block's place in line
    seq.num_computed_tokens = 20
    assert bm.try_append(seq, 14)
    meta.fill([14], [34], [seq.block_table], 16)
    assert meta.block_tables[0, :3].tolist() == seq.block_table
    bm.free(seq)
    bm.free(other)
    bm.check_invariants()
    assert bm.num_used_blocks == 0


class _EagerGraph:
    """Stands in for a captured verify CUDA graph on the CPU: replay() runs the compiled
    model on the runner's whole padded input buffers and fills the graph's logits buffer,
    as the graph would. What it checks is the replay plumbing (staging, padding sequences,
    logits rows); the capture itself needs a GPU."""

    def __init__(self, runner, total: int, logits: torch.Tensor):
        self.runner, self.total, self.logits, self.replays = runner, total, logits, 0

    def replay(self):
        from trtllm.attention_context import attention_context
        r = self.runner
        with attention_context(r.cache, r.meta):
            self.logits.copy_(r.compiled(*r._flat_batch(self.total))[0])
        self.replays += 1


def test_verify_graph_replay_path_keeps_output_identical(target):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (40, 12, 12)]
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[4]]
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    k = 3
    cfg = DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir=str(target), verify_cuda_graphs=True)
    with small_llm(target, speculative_config=cfg) as llm:
        runner = llm.engine.runner
        assert not runner.cuda_graphs.verify  # CPU: nothing captured
        graphs = {b: _EagerGraph(runner, b * (k + 1), torch.zeros(b * (k + 1), 512)) for b in (1, 2, 4)}
        runner.cuda_graphs.verify = {b: (g, g.logits) for b, g in graphs.items()}
        runner.cuda_graphs.verify_len = k + 1
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.block_manager.check_invariants()
    assert got == expected
    assert graphs[4].replays > 0  # 3 sequences padded to the graph of 4
    assert graphs[1].replays > 0  # the long request alone


class _EagerDecodeGraph:
    """Stands in for a captured decode CUDA graph on the CPU: replay() runs the compiled
    model on the runner's b padded input tokens and fills the graph's logits and greedy
    picks, as the graph would; its picks feed the next step of a chained draft proposal
    (execute_ahead's gather). The capture itself needs a GPU."""

    def __init__(self, runner, b: int, vocab: int):
        self.runner, self.b, self.replays = runner, b, 0
        self.logits, self.greedy = torch.zeros(b, vocab), torch.zeros(2, b, dtype=torch.long)

    def replay(self):
        from trtllm.attention_context import attention_context
        from trtllm.runtime.sampler import greedy_picks
        r = self.runner
        with attention_context(r.cache, r.meta):
            self.logits.copy_(r.compiled(*r._flat_batch(self.b))[0])
        self.greedy.copy_(greedy_picks(self.logits))
        self.replays += 1


@pytest.mark.parametrize("kind", ["draft_self", "draft_noisy", "draft_random"])
def test_chained_draft_steps_keep_output_identical(target, plain, kind):
    """Greedy drafts on decode graphs: the k draft steps are queued back to back, each fed
    the step before's picks on the device, one read at the end (draft_model._propose_chained).
    Greedy output stays the plain target's; a batch with a sampled request goes step by step."""
    prompts, params, expected = plain
    with small_llm(target, speculative_config=_configs(target)[kind]) as llm:
        proposer = llm.engine.speculative.draft
        runner = proposer.runner
        graphs = {b: _EagerDecodeGraph(runner, b, 512) for b in (1, 2, 4, 8)}
        runner.cuda_graphs.decode = {b: (g, g.logits, g.greedy) for b, g in graphs.items()}
        chained, stepwise = [], []
        proposer._propose_chained = _counted(proposer._propose_chained, chained)
        proposer._propose_stepwise = _counted(proposer._propose_stepwise, stepwise)
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0 and not p.penalised]
        got, _ = run(llm, [prompts[i] for i in greedy], [params[i] for i in greedy])
        assert chained and not stepwise and sum(g.replays for g in graphs.values()) > 0
        mixed, _ = run(llm, prompts, params)  # penalised and sampled requests: step by step
        assert stepwise
        stats = vars(llm.engine_stats())
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
        proposer.block_manager.check_invariants()
        assert proposer.block_manager.num_used_blocks == 0 and not proposer.mirrors
    assert got == [expected[i] for i in greedy]
    assert mixed[:-1] == expected[:-1]
    if kind == "draft_self":
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    if kind == "draft_noisy":
        assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_chained_proposal_takes_the_accepted_last_draft_into_its_first_step(target, plain):
    """After a verify step that accepted every draft, the draft has not computed the last
    draft token: it rides in the proposal's first step (two tokens, picked on the device),
    so a proposal is k draft launches, not a catch-up step more (whose LM head would be read
    for logits no one uses)."""
    prompts, params, expected = plain
    k = 3
    with small_llm(target, speculative_config=_configs(target)["draft_self"]) as llm:
        proposer = llm.engine.speculative.draft
        runner = proposer.runner
        graphs = {b: _EagerDecodeGraph(runner, b, 512) for b in (1, 2, 4, 8)}
        runner.cuda_graphs.decode = {b: (g, g.logits, g.greedy) for b, g in graphs.items()}
        chained, batches, ahead = [], [], []
        proposer._propose_chained = _counted(proposer._propose_chained, chained)
        execute, execute_ahead = runner.execute, runner.execute_ahead
        runner.execute = lambda batch: (batches.append([n for _, n in batch]), execute(batch))[1]
        runner.execute_ahead = lambda *a: (ahead.append(1), execute_ahead(*a))[1]
        got, _ = run(llm, [prompts[0]], [params[0]])
        stats = vars(llm.engine_stats())
    assert got == [expected[0]]
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    # one prompt catch-up, then each proposal's first step: its two uncomputed tokens (the first
    # proposal's: the prompt's last and the first output)
    assert len(batches) == 1 + len(chained) and len(chained) > 1 and all(b == [2] for b in batches[1:])
    assert len(ahead) <= (k - 1) * len(chained)


def test_rejected_drafts_back_off_and_the_overlap_scheduler_runs_meanwhile(target, plain):
    """A draft that is never right (another random model): after two verify steps with no
    draft accepted a sequence decodes plainly for 4 tokens, then 8, ... (decoder.py's
    back-off), and those plain steps are launched ahead (decode graphs: eager stand-ins).
    Greedy output stays the plain target's."""
    prompts, params, expected = plain
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0 and not p.penalised]
    with small_llm(target, speculative_config=_configs(target)["draft_random"]) as llm:
        for runner in (llm.engine.runner, llm.engine.speculative.draft.runner):
            graphs = {b: _EagerDecodeGraph(runner, b, 512) for b in (1, 2, 4, 8)}
            runner.cuda_graphs.decode = {b: (g, g.logits, g.greedy) for b, g in graphs.items()}
        ahead = []
        llm.engine.on_step = lambda record: ahead.append(record.launched_ahead)
        got, outs = run(llm, [prompts[i] for i in greedy], [params[i] for i in greedy])
        stats = vars(llm.engine_stats())
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
        assert not llm.engine.speculative._back_off  # forgotten once the sequences left
    assert got == [expected[i] for i in greedy]
    first = outs[0].outputs[0]  # 40 tokens: verify steps at tokens 1, 2, 7, 8, 17, 18, 35, 36 at most
    assert 2 <= first.num_verify_steps <= 8 and stats["spec_accepted_tokens"] <= 1
    assert any(ahead)


def test_backed_off_sequences_drafting_beside_others_keep_the_targets_tokens(target):
    # uniform_verify (set where verify graphs are captured): a noisy draft backs some sequences off while
    # others speculate; they draft on, and greedy output stays the plain target's, books balanced
    prompts = [[5, 17, 99, 3], [400, 2, 9], list(range(60, 70)), [7, 8, 9, 7], [31, 41, 59, 26, 53]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(target, speculative_config=_configs(target)["draft_noisy"]) as llm:
        dec = llm.engine.speculative
        dec.uniform_verify = True
        beside = []  # per step: backed-off sequences that drafted
        propose = dec.propose

        def recorded(running, in_flight=frozenset(), waiting=()):
            propose(running, in_flight, waiting)
            beside.append(sum(1 for s in running if dec._backed_off(s) and s.draft_token_ids))
        dec.propose = recorded
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
    assert sum(beside) > 0, "no backed-off sequence drafted beside another: the test could not fail"
    assert got == expected


def test_back_off_books():
    from trtllm.runtime.sequence import Sequence, SequenceStatus
    from trtllm.runtime.speculative.decoder import FIRST_BACK_OFF, SpeculativeDecoder
    dec = SpeculativeDecoder(3, 1000, 512, [], max_matching_ngram_size=2)
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=500), output_token_ids=[4],
                   status=SequenceStatus.RUNNING)
    seq.num_computed_tokens = seq.num_tokens - 1
    assert dec.draft_len(seq) == 3
    dec._count_misses(seq, 0)
    assert dec.draft_len(seq) == 3 and dec.speculates_next([seq])  # one miss: still speculating
    dec._count_misses(seq, 0)  # two in a row: backed off for FIRST_BACK_OFF tokens after the next
    seq.output_token_ids.append(5)
    seq.num_computed_tokens += 1
    for _ in range(FIRST_BACK_OFF):
        assert dec.draft_len(seq) == 0
        seq.output_token_ids.append(6)
        seq.num_computed_tokens += 1
    assert dec.draft_len(seq) == 3
    dec._count_misses(seq, 0)
    dec._count_misses(seq, 0)  # the next back-off is twice as long
    assert not dec.speculates_next([seq]) and dec._back_off[seq][2] == seq.num_tokens + 1 + 2 * FIRST_BACK_OFF
    dec._count_misses(seq, 1)  # an accepted draft: speculating at once, the back-off reset
    assert dec.draft_len(seq) == 3 and seq not in dec._back_off


def test_under_verify_graphs_a_backed_off_sequence_drafts_while_another_does():
    # a step of ragged draft lengths runs outside the verify graphs: under them, back-off holds only
    # while every speculating sequence is backed off
    from trtllm.runtime.sequence import Sequence, SequenceStatus
    from trtllm.runtime.speculative.decoder import SpeculativeDecoder

    class Drafts:  # a draft model's proposer that records who drafts
        asked: list = []

        def propose(self, seqs, ks, live):
            self.asked = [s.request_id for s in seqs]
            return [([7] * k, None) for k in ks]
    dec = SpeculativeDecoder(3, 1000, 512, [], draft=Drafts())
    a, b = (Sequence(r, [1, 2, 3], SamplingParams(max_tokens=500), output_token_ids=[4],
                     status=SequenceStatus.RUNNING) for r in "ab")
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens - 1
    dec._count_misses(b, 0)
    dec._count_misses(b, 0)  # b backed off
    dec.propose([a, b])
    assert dec.draft.asked == ["a"] and b.draft_token_ids == []  # no verify graphs: back-off holds
    dec.uniform_verify = True
    dec.propose([a, b])
    assert dec.draft.asked == ["a", "b"] and b.draft_token_ids == [7, 7, 7]
    dec._count_misses(a, 0)
    dec._count_misses(a, 0)  # both backed off: neither drafts
    dec.propose([a, b])
    assert dec.draft.asked == [] and a.draft_token_ids == b.draft_token_ids == []


def _counted(fn, calls: list):
    def counted(*a, **kw):
        calls.append(1)
        return fn(*a, **kw)
    return counted


@pytest.mark.slow  # ~30 s: spawns an engine process (the wire's counts are unit-tested in test_wire.py)
def test_an_engine_process_speculates_and_reports_its_counts(target):
    """trtllm-serve's path: the engine in its own process, the config pickled to it; the
    per-completion counts come back with the last delta, the engine-wide ones with stats."""
    import asyncio
    import functools

    from trtllm.runtime.build_engine import build_engine
    from trtllm.runtime.engine_client import EngineCoreClient
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = llm.generate(PROMPTS[2], params).outputs[0].token_ids
    options = dict(dtype="float32", build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64),
                   kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
                   speculative_config=NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "0")
        with EngineCoreClient(functools.partial(build_engine, str(target), **options), tokenizer=str(target),
                              start_timeout=300) as client:
            async def go():
                return await client.generate_async(PROMPTS[2], params).aresult()

            out = asyncio.run(go())
            stats = client.engine_stats()
    c = out.outputs[0]
    assert c.token_ids == expected
    assert c.num_verify_steps > 0 and c.num_accepted_draft_tokens > 0
    assert stats.spec_accepted_tokens == c.num_accepted_draft_tokens


@pytest.mark.parametrize("num_blocks, granted", [(3, False), (4, True)])
def test_drafts_never_take_a_block_a_later_sequence_may_need(num_blocks, granted):
    """a's drafts need a second block: granted only if one stays free for b after it. Then
    every draft is rejected and the block goes back (the new token fits in the first)."""
    from trtllm.runtime.block_manager import BlockManager
    from trtllm.runtime.scheduler import Scheduler
    from trtllm.runtime.sequence import Sequence
    bm = BlockManager(num_blocks, 16, enable_block_reuse=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_tokens=64, max_model_len=64)
    a, b = (Sequence(r, list(range(14)), SamplingParams(max_tokens=20)) for r in "ab")
    sched.add(a)
    sched.add(b)
    sched.update(sched.schedule(), {a: 1, b: 2})  # both prefilled: 15 tokens, 14 computed, a block each
    a.draft_token_ids = [5, 6, 7]  # positions 14..17: a second block
    scheduled = sched.schedule()
    assert scheduled == ([(a, 4), (b, 1)] if granted else [(a, 1), (b, 1)])
    assert sched.num_preemptions == 0 and a.draft_token_ids == ([5, 6, 7] if granted else [])
    assert len(a.block_table) == (2 if granted else 1)
    sched.update(scheduled, {a: [9] if granted else 9, b: 3})  # every draft rejected: the target's 9
    assert a.output_token_ids == [1, 9] and a.num_computed_tokens == 15 and len(a.block_table) == 1
    bm.check_invariants([a, b])
    assert bm.num_used_blocks == 2


def test_guided_and_beam_requests_are_not_speculated_and_keep_their_output(target):
    """A grammar's matcher and a beam search take the engine's own sampling, one token a step:
    on a speculating engine they decode as on a plain one (no step speculates while they run;
    the greedy request beside them speculates once they end)."""
    pytest.importorskip("xgrammar")
    from trtllm.sampling_params import GuidedDecodingParams
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[2]]
    params = [SamplingParams(max_tokens=8, temperature=0.0, guided_decoding=GuidedDecodingParams(choice=["yes", "no"])),
              SamplingParams(max_tokens=6, temperature=0.0, beam_width=2, n=2),
              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)]
    build = BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64, max_beam_width=2)
    kv = KvCacheConfig(tokens_per_block=16, max_tokens=4096)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with LLM(str(target), dtype="float32", kv_cache_config=kv, build_config=build) as llm:
            expected, _ = run(llm, prompts, params)
        cfg = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(target))
        with LLM(str(target), dtype="float32", kv_cache_config=kv, build_config=build, speculative_config=cfg) as llm:
            got, outs = run(llm, prompts, params)
            llm.block_manager.check_invariants()
            assert llm.block_manager.num_used_blocks == 0
    assert got == expected and got[0][0][1] in ("yes", "no")
    assert outs[0].outputs[0].num_verify_steps == 0 and all(c.num_verify_steps == 0 for c in outs[1].outputs)
    assert outs[2].outputs[0].num_verify_steps > 0


def test_verify_graphs_default_to_wherever_the_engine_can():
    """None (capture on a GPU, not for MLA), passed through the manual's spelling; True and
    False stay explicit."""
    assert NGramDecodingConfig().verify_cuda_graphs is None
    assert DraftTargetDecodingConfig(speculative_model_dir="d").verify_cuda_graphs is None
    assert SpeculativeDecodingConfig(draft_model="d").as_draft_target().verify_cuda_graphs is None
    assert SpeculativeDecodingConfig(draft_model="d", verify_cuda_graphs=False).as_draft_target() \
        .verify_cuda_graphs is False


@pytest.mark.parametrize("kind", ["guided", "logits_processor", "beam"])
def test_a_request_admitted_while_others_verify_drafts_is_sampled_by_the_engine(target, kind, monkeypatch):
    """A grammar, logits processor or beam search request that arrives while another sequence
    speculates: the step that admits it must not be a verify step, whose plain rows the
    speculative sampler takes without bitmasks, processors or the beam search (found by
    tests/runtime/test_mixed_workloads.py: its first token was sampled unconstrained, and the
    grammar's matcher failed the request, "the grammar refused token ..."). The n-gram proposer
    here drafts at every step (the last token again), so the admitting step would verify."""
    import asyncio
    import re

    import trtllm.runtime.speculative.decoder as decoder
    from trtllm import GuidedDecodingParams

    monkeypatch.setattr(decoder, "propose_ngram", lambda tokens, k, n: [tokens[-1]] * k)

    class OnlyToken7:
        def __call__(self, req_id, logits, ids, stream_ptr, client_id):
            mask = torch.full_like(logits, float("-inf"))
            mask[..., 7] = 0
            logits.add_(mask)

    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    late = {"guided": SamplingParams(max_tokens=8, temperature=0.9, seed=1,
                                     guided_decoding=GuidedDecodingParams(regex="[ab]{2,6}")),
            "logits_processor": SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                               logits_processor=OnlyToken7()),
            "beam": SamplingParams(max_tokens=6, beam_width=2, temperature=0.0, ignore_eos=True)}[kind]
    with LLM(str(target), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64, max_beam_width=2),
             speculative_config=NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2)) as llm:
        alone = llm.generate(PROMPTS[0], late)

        async def both():
            first = llm.generate_async(PROMPTS[2], greedy, streaming=True)
            outs = []
            async for out in first:  # a few tokens in (drafts verified at every step), then the other
                if len(out.outputs[0].token_ids) >= 4:
                    break
            second = llm.generate_async(PROMPTS[0], late)
            outs.append(await second.aresult())
            outs.append(await first.aresult())
            return outs

        out, first = asyncio.run(both())
        assert first.outputs[0].num_verify_steps > 0
        assert [(c.token_ids, c.finish_reason) for c in out.outputs] == \
            [(c.token_ids, c.finish_reason) for c in alone.outputs]
        if kind == "guided":
            assert re.fullmatch("[ab]{2,6}", out.outputs[0].text), out.outputs[0].text
        if kind == "logits_processor":
            assert out.outputs[0].token_ids == [7] * 4


def test_under_verify_graphs_sequences_near_max_tokens_keep_the_step_uniform(target):
    # uniform_verify: a sequence whose max_tokens is near verifies max_draft_len drafts like the
    # others (a ragged step runs outside the verify graphs); the stop checks cut its run at
    # max_tokens, the drafts past it count nowhere, and greedy output stays the plain target's
    prompts = [[5, 17, 99, 3], [400, 2, 9], list(range(60, 70)), [7, 8, 9, 7]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (7, 10, 13, 21)]
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(target, speculative_config=_configs(target)["draft_self"]) as llm:
        llm.engine.speculative.uniform_verify = True
        steps = []  # per step: the query lengths of the sequences that verified drafts
        execute = llm.engine.runner.execute
        llm.engine.runner.execute = lambda scheduled: (steps.append({n for _, n in scheduled if n > 1}),
                                                       execute(scheduled))[1]
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = vars(llm.engine_stats())
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    verify = [s for s in steps[1:] if s]  # after the prefill
    assert verify and all(s == {4} for s in verify), verify  # max_draft_len 3: every verify step 4 tokens
    # the self-draft's tokens are all accepted: every output token but the prefill's is an accepted
    # draft, a verify step's own, or a sequence's last (verifying only drafts past max_tokens: none
    # counted, nor the step); no draft past max_tokens is counted
    tokens = sum(len(o.outputs[0].token_ids) for o in outs) - len(prompts)
    accepted, steps = stats["spec_accepted_tokens"], stats["spec_verify_steps"]
    assert accepted <= stats["spec_draft_tokens"] <= tokens
    assert accepted + steps <= tokens <= accepted + steps + len(prompts)


def test_under_verify_graphs_an_ngram_miss_drafts_beside_a_hit():
    # uniform_verify with n-gram lookup: a sequence whose lookup finds nothing verifies its last token
    # repeated while another's finds drafts (a ragged step runs outside the verify graphs)
    from trtllm.runtime.sequence import Sequence, SequenceStatus
    from trtllm.runtime.speculative.decoder import SpeculativeDecoder
    dec = SpeculativeDecoder(3, 1000, 512, [], max_matching_ngram_size=2)
    hit, miss = (Sequence(r, p, SamplingParams(max_tokens=500), output_token_ids=[o], status=SequenceStatus.RUNNING)
                 for r, p, o in (("hit", [7, 8, 9, 7, 8], 9), ("miss", [1, 2, 3, 4], 5)))
    for seq in (hit, miss):
        seq.num_computed_tokens = seq.num_tokens - 1
    dec.propose([hit, miss])
    assert hit.draft_token_ids == [7, 8, 9] and miss.draft_token_ids == []  # no verify graphs: it decodes
    dec.uniform_verify = True
    dec.propose([hit, miss])
    assert hit.draft_token_ids == [7, 8, 9] and miss.draft_token_ids == [5, 5, 5]
    dec.propose([miss])  # no one found drafts: a plain decode step
    assert miss.draft_token_ids == []


def test_under_verify_graphs_ngram_steps_keep_one_shape_and_the_targets_tokens(target):
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], list(range(200, 212)), [5, 17, 99, 3]]
    params = SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(target, speculative_config=_configs(target)["ngram"]) as llm:
        llm.engine.speculative.uniform_verify = True
        steps = []
        execute = llm.engine.runner.execute
        llm.engine.runner.execute = lambda scheduled: (steps.append({n for _, n in scheduled if n > 1}),
                                                       execute(scheduled))[1]
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
    assert got == expected
    assert any(steps[1:]) and all(s == {4} for s in steps[1:] if s), steps  # after the prefill: 4 tokens each


def test_aborting_the_last_request_frees_the_draft_models_blocks(target):
    """An abort that empties the engine while a draft model mirrors the sequence: no step runs
    after it, so the abort itself releases the draft's pool (a mix test found 1 block held)."""
    config = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(target))
    with small_llm(target, speculative_config=config) as llm:
        draft = llm.engine.speculative.draft
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        stream = llm._submit(PROMPTS[2], params, streaming=True)
        for i, partial in enumerate(stream):  # noqa: B007 (the last one is checked below)
            if i == 1:
                llm.abort(stream.request_id)
        assert partial.outputs[0].finish_reason == "abort"
        assert not llm.has_unfinished()
        assert draft.block_manager.num_used_blocks == 0 and not draft.mirrors
        draft.block_manager.check_invariants()

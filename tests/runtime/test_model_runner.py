"""The decode-graph path of ModelRunner.execute, on CPU: the runner is given eager
stand-ins with a CUDA graph's semantics (fixed input buffers read at replay, fixed
output buffers written, capture-time host ints), so padding to a bucket, the greedy
picks read back, and logits handed to the sampler are checked without a GPU."""
import pytest
import torch

from trtllm.attention_context import attention_context
from trtllm.config import BuildConfig, ConfigError, CudaGraphConfig, KvCacheConfig
from trtllm.models.loader import load_model
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes, decode_batch_sizes, prefill_token_sizes
from trtllm.runtime.llm import LLM
from trtllm.runtime.llm_args import DEFAULT_CUDA_GRAPHS, cuda_graph_options
from trtllm.runtime.sampler import greedy_picks
from trtllm.sampling_params import SamplingParams


class EagerGraph:
    def __init__(self, runner, batch: int, vocab: int):
        self.runner, self.batch = runner, batch
        self.logits = torch.zeros(batch, vocab)
        self.greedy = torch.zeros(2, batch, dtype=torch.long)
        self.replays = 0

    def replay(self) -> None:
        r, b = self.runner, self.batch
        meta = r.meta
        host_ints = meta.num_seqs, meta.max_query_len, meta.max_seq_len
        meta.num_seqs, meta.max_query_len, meta.max_seq_len = b, 1, r.max_model_len  # as captured
        try:
            with attention_context(r.cache, meta), r.graph_inputs():
                logits = r.compiled(*r._flat_batch(b))[0]
        finally:
            meta.num_seqs, meta.max_query_len, meta.max_seq_len = host_ints
        self.logits.copy_(logits)
        self.greedy.copy_(greedy_picks(logits))
        self.replays += 1


def make_llm(path, graphs: bool, kv_tokens: int = 1024, overlap: bool = True, **build) -> LLM:
    model = load_model(path, dtype=torch.float32, device="cpu")
    llm = LLM(model, kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=kv_tokens),
              build_config=BuildConfig(**{"max_batch_size": 8, "max_num_tokens": 64, "max_seq_len": 64, **build}),
              disable_overlap_scheduler=not overlap)
    if graphs:
        runner = llm.engine.runner
        for b in cuda_graph_batch_sizes(runner.meta.max_num_seqs):
            g = EagerGraph(runner, b, 512)
            runner.cuda_graphs.decode[b] = (g, g.logits, g.greedy)
    return llm


PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9], [7, 7, 7]]  # 5 pad to 8


@pytest.mark.parametrize("build", [{}, {"max_num_tokens": 8}], ids=["whole", "chunked"])
def test_decode_graphs_give_the_tokens_eager_steps_give(checkpoint, build):
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=3, logprobs=1, ignore_eos=True)
    params = [greedy, greedy, sampled, greedy, greedy]  # a sampled one: logits go to the sampler
    outs = {}
    for graphs in (False, True):
        with make_llm(checkpoint, graphs, **build) as llm:
            for mix in ([greedy] * len(PROMPTS), params):
                got = llm.generate(PROMPTS, mix, use_tqdm=False)
                outs.setdefault(graphs, []).append([o.outputs[0].token_ids for o in got])
                outs[graphs].append([o.outputs[0].logprobs for o in got])
            if graphs:
                assert sum(g.replays for g, _, _ in llm.engine.runner.cuda_graphs.decode.values()) > 0
            llm.block_manager.check_invariants()
    assert outs[True][0] == outs[False][0]  # all greedy: picks read back from the graph
    assert outs[True][2] == outs[False][2]  # mixed: graph logits through the sampler
    for a, b in zip(outs[True][3], outs[False][3]):
        assert (a is None) == (b is None)
        if a is not None:
            assert [list(d) for d in a] == [list(d) for d in b]
            assert all(d1[t] == pytest.approx(d2[t], abs=1e-4) for d1, d2 in zip(a, b) for t in d1)


def test_step_inputs_are_contiguous_so_the_profiling_graph_serves_later_prefills(checkpoint):
    """The KV-profiling call (contiguous [1, max_num_tokens]) compiles the first graph; dynamo
    guards its stride against its size, so a step's [1, n] inputs must be contiguous for that
    graph to serve them (model_runner._flat_batch: 28.9 s of recompilation on the H200)."""
    llm = make_llm(checkpoint, graphs=False)
    runner, seen = llm.engine.runner, []
    compiled = runner.compiled

    def recording(ids, positions, *rest):
        # is_contiguous() ignores a size-1 dim's stride; dynamo's guard does not
        seen.append((ids.stride() == (ids.shape[1], 1), positions.stride() == (positions.shape[1], 1),
                     tuple(ids.shape)))
        return compiled(ids, positions, *rest)

    runner.compiled = recording
    try:
        llm.generate([[5, 17, 99], [400, 2, 8, 9, 10]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    finally:
        runner.compiled = compiled
        llm.shutdown()
    assert seen and all(ids and pos for ids, pos, _ in seen), seen
    assert {shape[1] for *_, shape in seen} >= {8, 2}  # a prefill of both prompts, then decodes of two


class EagerPrefillGraph:
    """A prefill graph's semantics on CPU: capture-time bounds (num_seqs min(max_num_seqs, T),
    max_query_len T, max_seq_len the model's), T padded input tokens, min(T, max_num_seqs)
    logits rows of the staged flat indices, written into a fixed buffer."""

    def __init__(self, runner, tokens: int, vocab: int):
        self.runner, self.tokens, self.replays = runner, tokens, 0
        self.logits = torch.zeros(min(tokens, runner.meta.max_num_seqs), vocab)

    def replay(self) -> None:
        r, t = self.runner, self.tokens
        meta = r.meta
        host_ints = meta.num_seqs, meta.max_query_len, meta.max_seq_len
        meta.num_seqs, meta.max_query_len, meta.max_seq_len = min(meta.max_num_seqs, t), t, r.max_model_len
        try:  # what a captured graph reads besides the cache: staged image rows, hidden-state stores
            with attention_context(r.cache, meta), r.graph_inputs():
                logits = r.compiled(*r._flat_batch(t), r.logits_indices[:self.logits.shape[0]])
        finally:
            meta.num_seqs, meta.max_query_len, meta.max_seq_len = host_ints
        self.logits.copy_(logits)
        self.replays += 1


def add_prefill_graphs(llm: LLM, most: int) -> dict[int, EagerPrefillGraph]:
    """Stand-ins of the prefill graphs a GPU captures for steps of at most `most` tokens."""
    runner = llm.engine.runner
    graphs = {t: EagerPrefillGraph(runner, t, llm.engine.vocab_size) for t in prefill_token_sizes(most)}
    runner.cuda_graphs.prefill.update({t: (g, g.logits) for t, g in graphs.items()})
    return graphs


@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "triton-interpreter"])
@pytest.mark.parametrize("build", [{}, {"max_num_tokens": 8}], ids=["whole", "chunked"])
def test_prefill_graphs_give_the_tokens_eager_steps_give(checkpoint, build, interpret, monkeypatch):
    """Prefill, chunked-prefill and decode + prefill steps through token-bucket graphs (padding
    tokens and padding sequences inside the captured bounds) give eager's tokens and logprobs;
    a step whose rows outnumber a graph's, or that asks for prompt logprobs, runs eagerly."""
    if interpret:  # the Triton kernels under the bounds of a graph, not only the references
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    sampled = SamplingParams(max_tokens=5, temperature=0.8, top_k=20, seed=3, logprobs=2, ignore_eos=True)
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    params = [greedy, sampled, greedy, sampled, greedy]
    outs = {}
    for graphs in (False, True):
        with make_llm(checkpoint, graphs, **build) as llm:
            prefill = add_prefill_graphs(llm, llm.engine.runner.meta.max_num_tokens) if graphs else {}
            got = llm.generate(PROMPTS, params, use_tqdm=False)
            logprobs = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
            with_prompt = llm.generate(PROMPTS[:2], logprobs, use_tqdm=False)
            outs[graphs] = ([o.outputs[0].token_ids for o in got], [o.outputs[0].logprobs for o in got],
                            [o.prompt_logprobs for o in with_prompt])
            if graphs:
                assert sum(g.replays for g in prefill.values()) > 0
            llm.block_manager.check_invariants()
    assert outs[True][0] == outs[False][0]
    for a, b in zip(outs[True][1], outs[False][1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert [list(d) for d in a] == [list(d) for d in b]
            assert all(d1[t] == pytest.approx(d2[t], abs=1e-4) for d1, d2 in zip(a, b) for t in d1)
    for a, b in zip(outs[True][2], outs[False][2]):
        assert [list(d or {}) for d in a] == [list(d or {}) for d in b]


def test_prefill_graph_sizes_and_config():
    assert prefill_token_sizes(0) == []
    assert prefill_token_sizes(8) == [8]
    assert prefill_token_sizes(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert prefill_token_sizes(600) == [16, 32, 64, 128, 256, 512, 600]
    assert decode_batch_sizes(CudaGraphConfig(), 12) == [1, 2, 4, 8, 12]
    assert decode_batch_sizes(CudaGraphConfig(max_batch_size=4), 12) == [1, 2, 4]
    assert decode_batch_sizes(CudaGraphConfig(batch_sizes=[8, 3, 3]), 12) == [3, 8]
    with pytest.raises(ValueError, match=r"batch_sizes \[16\] exceed max_batch_size=12"):
        decode_batch_sizes(CudaGraphConfig(batch_sizes=[16, 4]), 12)
    for bad in ({"batch_sizes": []}, {"batch_sizes": [0]}, {"max_prefill_tokens": -1}, {"max_batch_size": -2},
                {"padding": True}, {"batch_sizes": [1, 2], "max_batch_size": 4}):
        with pytest.raises(ConfigError):
            CudaGraphConfig(**bad)
    assert CudaGraphConfig(batch_sizes=[1, 2], max_batch_size=2).max_batch_size == 2


def test_llm_takes_both_spellings_of_no_cuda_graphs():
    config = CudaGraphConfig(max_prefill_tokens=0)
    assert cuda_graph_options(True, DEFAULT_CUDA_GRAPHS) == (True, None)  # not given: the defaults
    assert cuda_graph_options(False, DEFAULT_CUDA_GRAPHS) == (False, None)
    assert cuda_graph_options(True, None) == (False, None)  # TensorRT-LLM's cuda_graph_config=None
    assert cuda_graph_options(True, config) == (True, config)
    with pytest.raises(ValueError, match="give one or the other"):
        cuda_graph_options(False, config)
    with pytest.raises(TypeError, match="CudaGraphConfig or None"):
        cuda_graph_options(True, {"batch_sizes": [1]})


def test_decode_graphs_without_padding_serve_only_their_sizes(checkpoint):
    with make_llm(checkpoint, graphs=True) as llm:
        assert llm.engine.runner.prefill_graphs_serve()  # (a CPU captures none)
        graphs = llm.engine.runner.cuda_graphs
        assert graphs.decode_size(3, 3, []) == 4
        graphs.padding = False
        assert graphs.decode_size(3, 3, []) is None
        assert graphs.decode_size(4, 4, []) == 4

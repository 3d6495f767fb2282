"""Random mixes of what requests may ask, in one engine with a small KV pool (preemption), chunked
prefill and the prefix cache: every request's output equals the same request run alone (greedy,
seeded sampling, n > 1, best_of, beams, logprobs, prompt logprobs, stop tokens, regex-guided; requests aborted
mid-run end as "abort"; with LoRA engines, adapters too), and afterwards no sequence is left and every KV block is free or cached;
the same with the overlap scheduler launching decode steps ahead, and with n-gram speculation."""
from __future__ import annotations

import asyncio
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.lora_adapters import write_adapter
from tests.models.checkpoints import write_checkpoint
from tests.runtime.test_eagle3 import write_head
from tests.runtime.test_model_runner import EagerGraph, add_prefill_graphs
from tests.runtime.test_overlap_scheduler import count_ahead
from tests.runtime.tokenizers import make_tokenizer
from trtllm import (
    LLM,
    BuildConfig,
    GuidedDecodingParams,
    KvCacheConfig,
    LoraConfig,
    LoRARequest,
    SamplingParams,
    SchedulerConfig,
)
from trtllm.config import QuantAlgo, QuantConfig
from trtllm.models.loader import load_model
from trtllm.quantization.fp8_linears import fp8_linears_of
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes
from trtllm.runtime.speculative.config import DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig

VOCAB = 512


@pytest.fixture(scope="module", params=["plain", "overlap", "ngram", "draft", "eagle3", "lora", "no_evict", "fp8",
                                        "fp8_kv"])
def llm(checkpoint, request, tmp_path_factory):
    """The engine; "overlap": decode and prefill steps through test_model_runner's CUDA-graph
    stand-ins, so the overlap scheduler launches the next greedy decode step ahead (as on a GPU); "ngram": with
    n-gram speculation (drafts verified beside plain rows, none while a beam search runs; the
    prompts repeat tokens, so lookups find drafts; uniform_verify as on a GPU: a miss beside a hit
    drafts its last token repeated); "draft": a draft model (the target itself, its
    own KV pool and mirrors of the target's sequences; uniform_verify as on a GPU: drafts past max_tokens,
    backed-off sequences drafting beside others); "eagle3": an EAGLE-3 head (random, on a
    4-layer target: the target's hidden states stashed a row per KV slot, the head's own pool); "lora": two adapters and one GPU slot, so
    requests of different adapters (and none) wait for the slot and run beside base rows, every
    step through decode and prefill graph stand-ins as on a GPU (each token's slot refilled at
    replay; decode steps launched ahead);
    "no_evict": SchedulerConfig(GUARANTEED_NO_EVICT), which admits fewer at once and never preempts
    (with the overlap scheduler too, which plans ahead while the front request waits for room);
    "fp8": QuantConfig FP8 (weights per tensor, activations per token) and "fp8_kv": an FP8 KV cache,
    whose outputs are compared by length and reason only. fp8_kv: a prompt prefilled in other chunk
    splits reads other KV rows back quantized, so its logprobs move by ~0.04 nats with its batch
    mates, by design. fp8: a step of one row runs the one-row fused kernels (silu_mul_fp8_gemm,
    quantize_fp8_gemm), which sum in another order than the multi-row ones (~1e-8 apart), and the
    next layer's e4m3 rounding of its activations can turn that into a whole e4m3 step: a greedy
    request's logprobs moved by 0.016 between alone and in a mix (hypothesis found it in CI)."""
    # 6 blocks of 16 tokens: two or three requests of ~20-40 tokens each (beams, n = 2: two
    # sequences) overflow it (preemption); 16 tokens a step: prompts prefill in chunks
    if request.param == "eagle3":  # the head reads states leaving layers 0, 1, 2 of a 4-layer target
        checkpoint = write_checkpoint("llama31", tmp_path_factory.mktemp("eagle_target"), vocab_size=VOCAB,
                                      num_hidden_layers=4)
        head = write_head(tmp_path_factory.mktemp("eagle_head"))
    make_tokenizer(checkpoint)  # guided requests need the vocabulary's strings
    model = load_model(checkpoint, dtype=torch.float32, device="cpu")
    speculative = None
    if request.param == "ngram":
        speculative = NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2)
    elif request.param == "draft":
        speculative = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(checkpoint))
    elif request.param == "eagle3":
        speculative = EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(head))
    options = {}
    if request.param == "lora":
        options["lora_config"] = LoraConfig(max_lora_rank=8, max_loras=1, max_cpu_loras=2)
        adapters = []
        for i in (1, 2):
            path = tmp_path_factory.mktemp(f"adapter{i}")
            write_adapter(checkpoint, path, r=8, seed=i)
            adapters.append(LoRARequest(f"adapter{i}", i, str(path)))
    if request.param == "fp8":  # FP8 linears, activations quantized per token
        options["quant_config"] = QuantConfig(quant_algo=QuantAlgo.FP8)
    if request.param == "fp8_kv":  # an FP8 KV cache: beams' copy-on-write copies its bytes, preemption frees it
        options["quant_config"] = QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8)
    if request.param == "no_evict":
        options["scheduler_config"] = SchedulerConfig(capacity_scheduler_policy="GUARANTEED_NO_EVICT")
    with LLM(model, tokenizer=str(checkpoint), speculative_config=speculative, **options,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=96),
             build_config=BuildConfig(max_batch_size=6, max_num_tokens=16, max_seq_len=48, max_beam_width=2)) as llm:
        if request.param in ("overlap", "no_evict", "lora"):
            runner = llm.engine.runner
            for b in cuda_graph_batch_sizes(runner.meta.max_num_seqs):
                g = EagerGraph(runner, b, VOCAB)
                runner.cuda_graphs.decode[b] = (g, g.logits, g.greedy)
            if request.param in ("overlap", "lora"):
                add_prefill_graphs(llm, 16)
        if request.param in ("ngram", "draft", "eagle3"):  # as on a GPU, where verify graphs are captured: every
            llm.engine.speculative.uniform_verify = True  # speculating sequence verifies max_draft_len drafts
        llm.adapters = [None] + adapters if "lora_config" in options else [None]  # what a request's adapter index picks from
        llm.launched_ahead = count_ahead(llm)  # one entry per step the overlap scheduler tried to launch ahead
        yield llm


PROMPTS = [[5, 17, 99, 3, 250, 31, 8, 60, 61, 62, 63, 64], [5, 17, 99, 3, 250, 31, 8, 60, 61, 62, 7],  # a shared prefix
           [400, 2], list(range(100, 121)), [9], [7, 7, 7, 7, 7, 7, 7, 7, 7]]


@st.composite
def request(draw):
    prompt = draw(st.sampled_from(PROMPTS))
    kind = draw(st.sampled_from(["greedy", "sampled", "n2", "best_of", "beam", "logprobs", "prompt_logprobs",
                                 "stop", "guided"]))
    fields = dict(max_tokens=draw(st.integers(1, 20)), ignore_eos=True)
    if kind == "greedy":
        fields.update(temperature=0.0)
    elif kind == "sampled":
        fields.update(temperature=0.9, top_k=draw(st.sampled_from([0, 20])), seed=draw(st.integers(0, 99)))
    elif kind == "n2":
        fields.update(temperature=0.8, seed=draw(st.integers(0, 99)), n=2)
    elif kind == "best_of":
        fields.update(temperature=0.8, seed=draw(st.integers(0, 99)), n=1, best_of=2)
    elif kind == "beam":
        fields.update(temperature=0.0, beam_width=2, n=draw(st.sampled_from([1, 2])))
    elif kind == "logprobs":
        fields.update(temperature=0.0, logprobs=2)
    elif kind == "prompt_logprobs":
        fields.update(temperature=0.0, prompt_logprobs=1)
    elif kind == "guided":  # a grammar's bitmask each step (no speculation while it runs)
        fields.update(temperature=draw(st.sampled_from([0.0, 0.9])), seed=draw(st.integers(0, 99)), ignore_eos=False,
                      guided_decoding=GuidedDecodingParams(regex=draw(st.sampled_from(["[ab]{2,9}", "(yes|no)!"]))))
    else:
        fields.update(temperature=0.0, stop_token_ids=[draw(st.integers(0, VOCAB - 1))])
    abort = draw(st.booleans()) and draw(st.booleans())  # ~1 in 4 aborted
    return prompt, SamplingParams(**fields), abort, draw(st.integers(0, 2))  # an adapter index (the lora engine)


def _result(out) -> tuple:
    completions = tuple((tuple(c.token_ids), c.finish_reason, tuple(tuple(sorted(d.items())) for d in c.logprobs or ()))
                        for c in out.outputs)
    prompt = tuple(tuple(sorted(d.items())) if d else None for d in out.prompt_logprobs or ())
    return completions, prompt


def _close(a: tuple, b: tuple) -> bool:
    """Equal tokens and reasons; logprob values within 1e-4 (another batch sums in another order)."""
    (ca, pa), (cb, pb) = a, b
    if [(t, r) for t, r, _ in ca] != [(t, r) for t, r, _ in cb] or len(pa) != len(pb):
        return False
    pairs = [(x, y) for (_, _, la), (_, _, lb) in zip(ca, cb) for x, y in zip(la, lb)] + list(zip(pa, pb))
    for x, y in pairs:
        if (x is None) != (y is None):
            return False
        if x is not None and ([t for t, _ in x] != [t for t, _ in y]
                              or any(abs(u - v) > 1e-4 for (_, u), (_, v) in zip(x, y))):
            return False
    return True


def _rejection_sampled(llm, params: SamplingParams) -> bool:
    """A sampled request on a draft-model engine: its tokens come from rejection sampling of the
    draft's proposals, which depend on whether a step speculated (its batch mates decide: a guided
    one stops speculation), so the same seed alone may give other tokens (tests/runtime/test_speculative.py)."""
    spec = llm.engine.speculative
    return spec is not None and spec.draft is not None and not params.greedy and params.beam_width == 1


def _quantized(llm) -> bool:
    """An FP8 or INT8 KV cache, or FP8 activations: a request's logits depend on its batch mates (where
    its prefill was cut; which kernels its steps ran), by an e4m3 step at times (the fixture's docstring)."""
    runner = llm.engine.runner
    return runner.kv_quant is not None or fp8_linears_of(runner.compiled.module) is not None


def _adapter(llm, index: int):
    return llm.adapters[index % len(llm.adapters)]


async def _run_mix(llm, requests):
    streams = [llm.generate_async(prompt, params, streaming=True, lora_request=_adapter(llm, a))
               for prompt, params, _, a in requests]
    outs = []
    for stream, (_, _, abort, _) in zip(streams, requests):
        last = None
        async for out in stream:
            last = out
            if abort and not out.finished:
                llm.abort(stream.request_id)
        outs.append(last)
    return outs


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request(), min_size=2, max_size=6))
def test_a_mix_gives_each_request_its_own_output(llm, requests):
    check_mix(llm, requests)


def check_mix(llm, requests) -> None:
    """Run `requests` (from `request()`) at once on `llm`, then each alone: the same outputs, and
    nothing left in the engine (tests/parallel/test_llm_mixed_parallel.py runs it on ranks)."""
    outs = asyncio.run(_run_mix(llm, requests))
    for (prompt, params, abort, a), out in zip(requests, outs):
        assert out is not None and out.finished
        if abort and any(c.finish_reason == "abort" for c in out.outputs):
            continue  # cut short where the abort landed
        guide = params.guided_decoding
        for c in out.outputs if guide is not None else ():
            assert c.finish_reason == "length" or re.fullmatch(guide.regex, c.text), (guide.regex, c.text)
        alone = llm.generate([prompt], params, use_tqdm=False, lora_request=_adapter(llm, a))[0]
        if _rejection_sampled(llm, params) or _quantized(llm):  # not token for token: see each
            assert [(len(c.token_ids), c.finish_reason) for c in out.outputs] == \
                [(len(c.token_ids), c.finish_reason) for c in alone.outputs]
            continue
        assert _close(_result(out), _result(alone)), (params, _result(out), _result(alone))
    bm = llm.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks
    assert not llm.has_unfinished()
    draft = llm.engine.speculative.draft if llm.engine.speculative is not None else None
    if draft is not None:  # the draft model's pool: every mirror of a finished sequence freed
        draft.block_manager.check_invariants()
        assert draft.block_manager.num_used_blocks == 0 and not draft.mirrors
        assert getattr(draft, "eagle", None) is None or not draft.eagle.exact


def test_each_engine_did_what_it_is_for(llm):
    """A fixed mix (four long greedy requests on repeating prompts, more than the pool holds at
    once): the n-gram engine verifies drafts, the overlap engine launches decode steps ahead, the
    no-evict engine preempts nothing where the others do, and the outputs are the plain ones."""
    before, ahead = llm.engine_stats(), len(llm.launched_ahead)
    prompts = [PROMPTS[3], PROMPTS[5], PROMPTS[3][::-1], PROMPTS[5][1:]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]
    stats = llm.engine_stats()
    assert (stats.spec_verify_steps > before.spec_verify_steps) == (llm.engine.speculative is not None), stats
    preempted = stats.num_preemptions - before.num_preemptions
    assert preempted == 0 if llm.engine.scheduler.no_evict else preempted > 0, stats
    overlapped = sum(llm.launched_ahead[ahead:])
    assert (overlapped > 0) == bool(llm.engine.runner.cuda_graphs.decode), overlapped
    prefill = llm.engine.runner.cuda_graphs.prefill
    assert bool(prefill) == any(g.replays for g, _ in prefill.values())

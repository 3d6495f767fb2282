"""Beam search, best_of and returned logits on a tiny random Llama (fp32): beams equal HF
transformers' `generate(num_beams=k, ...)` token for token, with and without preemption;
blocks are shared copy-on-write and the pool's books balance after beams finish or abort;
greedy and sampled requests in the same batch are unaffected; best_of keeps the n highest
cumulative logprobs; context / generation logits equal HF's."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.attention_context import PagedKVCache
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.build_engine import build_engine
from trtllm.runtime.model_runner import ModelRunner
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81))]
STOP = 476  # a token this checkpoint's beams often pick: beams end by it (HF: a second EOS id)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("beams")
    write_checkpoint("llama31", path, vocab_size=512)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_model(checkpoint)


def engine_of(path, max_tokens=4096, **build):
    return build_engine(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16,
                                                                                 max_tokens=max_tokens),
                        build_config=BuildConfig(**{"max_batch_size": 16, "max_num_tokens": 64, "max_seq_len": 64,
                                                    "max_beam_width": 4, **build}))


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def hf_beams(hf, prompt, k, n, new, length_penalty=1.0, early_stopping=False, min_tokens=0):
    eos = [2, STOP]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=min_tokens, num_beams=k,
                      num_return_sequences=n,
                      do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                      eos_token_id=eos, pad_token_id=2, return_dict_in_generate=True, output_scores=True)
    rows = []
    for row in out.sequences[:, len(prompt):].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row if end is None else row[:end + 1])
    return rows, out.sequences_scores.tolist()


CASES = [dict(k=4, n=2, new=8, length_penalty=1.0, early_stopping=False, min_tokens=0),
         dict(k=3, n=3, new=7, length_penalty=0.5, early_stopping=True, min_tokens=0),
         dict(k=2, n=1, new=6, length_penalty=2.0, early_stopping="never", min_tokens=2)]


def beam_params(case, **extra):
    return SamplingParams(beam_width=case["k"], n=case["n"], max_tokens=case["new"], stop_token_ids=[STOP],
                          length_penalty=case["length_penalty"], early_stopping=case["early_stopping"],
                          min_tokens=case["min_tokens"], **extra)


def check_against_hf(hf, out, prompt, case):
    want, scores = hf_beams(hf, prompt, case["k"], case["n"], case["new"], case["length_penalty"],
                            case["early_stopping"], case["min_tokens"])
    got = [c.token_ids for c in out.outputs]
    assert got == want
    for c, score in zip(out.outputs, scores):  # HF's score: cumulative logprob / length ** length_penalty
        assert c.cumulative_logprob / len(c.token_ids) ** case["length_penalty"] == pytest.approx(score, abs=1e-4)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == STOP else "length")
    return got


def test_beam_search_equals_hf_generate(checkpoint, hf):
    engine = engine_of(checkpoint)
    requests = {f"{i}-{j}": (p, beam_params(case)) for i, case in enumerate(CASES) for j, p in enumerate(PROMPTS)}
    done = run(engine, requests)
    stops = 0
    for rid, (prompt, _) in requests.items():
        got = check_against_hf(hf, done[rid], prompt, CASES[int(rid[0])])
        stops += sum(t[-1] == STOP for t in got)
    assert stops > 0, "no beam ended by its stop token: the test checks less than it says"
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0


def test_beam_search_under_preemption_equals_hf_and_the_books_balance(checkpoint, hf):
    # 10 blocks of 16 tokens: three 4-beam groups (each forks into 4 private tail blocks)
    # cannot all run at once, so groups are preempted whole and start again
    engine = engine_of(checkpoint, max_tokens=160)
    case = dict(CASES[0], new=12)
    requests = {str(i): (p, beam_params(case)) for i, p in enumerate(PROMPTS)}
    done = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for rid, (prompt, _) in requests.items():
        check_against_hf(hf, done[rid], prompt, case)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0


def test_beam_search_with_chunked_prefill_and_the_prefix_cache_equals_hf(checkpoint, hf):
    engine = engine_of(checkpoint, max_batch_size=8, max_num_tokens=8)  # prompts in chunks of 8 tokens
    case = CASES[0]
    requests = {str(i): (p, beam_params(case)) for i, p in enumerate(PROMPTS)}
    first = run(engine, requests)
    again = run(engine, requests)  # the prompts' full blocks now come from the prefix cache
    assert engine.block_manager.prefix_hit_tokens > 0
    for rid, (prompt, _) in requests.items():
        check_against_hf(hf, first[rid], prompt, case)
        assert [c.token_ids for c in again[rid].outputs] == [c.token_ids for c in first[rid].outputs]
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0


def test_beams_share_prompt_blocks_and_an_abort_frees_them(checkpoint):
    engine = engine_of(checkpoint)
    prompt = list(range(100, 140))  # 40 tokens: 2 full blocks and a partial one
    engine.add_request("b", prompt, SamplingParams(beam_width=4, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    group = engine.beam_groups["b"]
    tables = [b.block_table for b in group.beams]
    assert all(t[:2] == tables[0][:2] for t in tables)  # full prompt blocks: shared by all four beams
    # the partial block: each beam wrote into a copy of its own, and its children share that
    # copy until they write into it (beams with one parent hold the same one)
    parents = [tuple(b.output_token_ids[:-1]) for b in group.beams]
    for i in range(4):
        for j in range(4):
            assert (tables[i][2] == tables[j][2]) == (parents[i] == parents[j])
    assert engine.block_manager.num_used_blocks == 2 + len(set(parents))
    engine.block_manager.check_invariants(group.beams)
    out = engine.abort("b")
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0 and not engine.beam_groups


def test_a_group_that_alone_fills_the_pool_ends_by_length(checkpoint):
    engine = engine_of(checkpoint, max_tokens=80)  # 5 blocks of 16: four beams outgrow it at token 16
    assert engine.block_manager.num_blocks == 5
    out = run(engine, {"x": (PROMPTS[0], SamplingParams(beam_width=4, n=2, max_tokens=30, ignore_eos=True))})["x"]
    assert [c.finish_reason for c in out.outputs] == ["length", "length"]
    assert all(0 < len(c.token_ids) < 30 for c in out.outputs)
    assert out.outputs[0].cumulative_logprob / len(out.outputs[0].token_ids) >= \
        out.outputs[1].cumulative_logprob / len(out.outputs[1].token_ids)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0 and not engine.beam_groups


def test_fork_and_copy_on_write_keep_the_books():
    bm = BlockManager(8, 4, enable_block_reuse=False)
    params = SamplingParams()
    a, b = Sequence("r", [1, 2, 3, 4, 5, 6], params), Sequence("r", [1, 2, 3, 4, 5, 6], params)
    bm.allocate(a)
    a.num_computed_tokens = 6
    bm.fork([b], [a])
    assert b.block_table == a.block_table and bm.num_used_blocks == 2
    bm.check_invariants([a, b])
    assert bm.try_append(a, 1) and bm.pending_copies == [(b.block_table[1], a.block_table[1], 2)]  # 2 held
    assert a.block_table[0] == b.block_table[0] and a.block_table[1] != b.block_table[1]
    b.num_computed_tokens = 6
    assert bm.try_append(b, 1) and len(bm.pending_copies) == 1  # b is the last holder: writes in place
    bm.check_invariants([a, b])
    bm.fork([a, b], [b, b])  # both become b: a's private block is freed
    assert a.block_table == b.block_table and bm.num_used_blocks == 2
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants()
    assert bm.num_used_blocks == 0


def test_the_runner_copies_held_tokens_and_refuses_counts_past_a_block():
    cache = PagedKVCache.allocate(2, 6, 4, 1, 8, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape))
    runner = SimpleNamespace(cache=cache, device=torch.device("cpu"), compiled=None, block_size=4)
    before = cache.k.clone()
    ModelRunner.copy_blocks(runner, [(1, 3, 2)])
    assert torch.equal(cache.k[:, 3, :2], before[:, 1, :2]) and torch.equal(cache.k[:, 3, 2:], before[:, 3, 2:])
    with pytest.raises(AssertionError, match="token count outside 1..4"):
        ModelRunner.copy_blocks(runner, [(1, 3, 5)])


def test_a_shared_block_that_holds_nothing_yet_is_replaced_without_a_copy():
    bm = BlockManager(8, 4, enable_block_reuse=False)
    a, b = (Sequence("r", list(range(1, 9)), SamplingParams()) for _ in range(2))
    bm.allocate(a)
    a.num_computed_tokens = 8
    assert bm.try_append(a, 1) and len(a.block_table) == 3  # the third block, empty so far
    bm.fork([b], [a])
    assert bm.try_append(a, 1) and a.block_table[2] != b.block_table[2] and bm.pending_copies == []
    bm.check_invariants([a, b])


def test_greedy_and_sampled_requests_are_unaffected_by_beams_in_the_batch(checkpoint):
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    alone = run(engine_of(checkpoint), {"g": (PROMPTS[0], greedy), "s": (PROMPTS[1], sampled)})
    mixed = run(engine_of(checkpoint), {"b0": (PROMPTS[2], beam_params(CASES[0])), "g": (PROMPTS[0], greedy),
                                        "b1": (PROMPTS[1], beam_params(CASES[1])), "s": (PROMPTS[1], sampled)})
    for rid in ("g", "s"):
        assert mixed[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids


def test_use_beam_search_best_of_is_the_same_search(checkpoint):
    engine = engine_of(checkpoint)
    trt = SamplingParams(use_beam_search=True, best_of=4, n=2, max_tokens=8, stop_token_ids=[STOP])
    done = run(engine, {"a": (PROMPTS[0], trt), "b": (PROMPTS[0], beam_params(CASES[0]))})
    assert [c.token_ids for c in done["a"].outputs] == [c.token_ids for c in done["b"].outputs]
    assert [c.index for c in done["a"].outputs] == [0, 1]
    assert done["a"].outputs[0].cumulative_logprob >= done["a"].outputs[1].cumulative_logprob


def test_beam_width_above_max_beam_width_is_refused_naming_both(checkpoint):
    engine = engine_of(checkpoint, max_beam_width=2)
    with pytest.raises(ValueError, match="beam width 4 exceeds max_beam_width=2"):
        engine.add_request("x", [1, 2], SamplingParams(beam_width=4))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("bad, why", [(dict(temperature=0.7), "temperature 0.7 with beam search"),
                                      (dict(top_p=0.5), "top_p with beam search"),
                                      (dict(logprobs=2), "logprobs with beam search"),
                                      (dict(apply_batched_logits_processor=True),
                                       "apply_batched_logits_processor with beam search"),
                                      (dict(n=5), r"n \(5\) exceeds the beam width \(4\)")])
def test_beam_search_refuses_what_it_does_not_do_by_name(bad, why):
    with pytest.raises(ValueError, match=why):
        SamplingParams(beam_width=4, **bad)


def test_best_of_keeps_the_n_highest_cumulative_logprobs(checkpoint):
    engine = engine_of(checkpoint)
    params = SamplingParams(n=2, best_of=5, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    every = SamplingParams(n=5, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logprobs=0)
    done = run(engine, {"best": (PROMPTS[0], params), "all": (PROMPTS[0], every)})
    ranked = sorted(done["all"].outputs, key=lambda c: -c.cumulative_logprob)[:2]
    best = done["best"].outputs
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.cumulative_logprob for c in best] == pytest.approx([c.cumulative_logprob for c in ranked])
    assert best[0].logprobs is None  # not asked for; ranked by them all the same
    with pytest.raises(ValueError, match=r"best_of \(1\) must be >= n \(2\)"):
        SamplingParams(n=2, best_of=1)


def test_best_of_aborted_before_ranking_says_abort_on_every_completion():
    """Aborted while one candidate had finished and another had not: the first n candidates come
    back unranked, each "abort" (a finished one is not the request's answer: the other may have
    been likelier). Before, such an output said "length" for whichever candidate came first."""
    from trtllm.runtime.output_builder import OutputBuilder
    params = SamplingParams(n=1, best_of=2, max_tokens=4, temperature=1.0, seed=1)
    seqs = [Sequence("r", [1, 2], params, index=i) for i in range(2)]
    builder = OutputBuilder("r", None, [1, 2], params, seqs, None, [], 64, stream=True)
    for seq in seqs:
        builder.append(seq, 5, None)
    builder.finish(seqs[0], "length")
    builder.abort()
    assert [c.finish_reason for c in builder.output.outputs] == ["abort"] and builder.output.finished
    plain = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1)  # n = 2: each completion its own answer
    seqs = [Sequence("q", [1, 2], plain, index=i) for i in range(2)]
    builder = OutputBuilder("q", None, [1, 2], plain, seqs, None, [], 64, stream=True)
    builder.finish(seqs[0], "length")
    builder.abort()
    assert [c.finish_reason for c in builder.output.outputs] == ["length", "abort"]


def test_context_and_generation_logits_equal_hf(checkpoint, hf):
    engine = engine_of(checkpoint, max_num_tokens=16)  # the prompt's logits come in two chunks
    prompt = list(range(30, 51))
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, return_context_logits=True,
                            return_generation_logits=True)
    out = run(engine, {"x": (prompt, params)})["x"]
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        want = hf(torch.tensor([prompt + tokens])).logits[0]
    assert out.context_logits.shape == (len(prompt), 512)
    torch.testing.assert_close(out.context_logits, want[:len(prompt)], atol=1e-4, rtol=1e-4)
    gen = out.outputs[0].generation_logits
    assert gen.shape == (len(tokens), 512)
    torch.testing.assert_close(gen, want[len(prompt) - 1:-1], atol=1e-4, rtol=1e-4)
    assert gen.argmax(-1).tolist() == tokens
    plain = run(engine, {"y": (prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))})["y"]
    assert plain.context_logits is None and plain.outputs[0].generation_logits is None


def test_returned_logits_are_the_models_under_logits_processors(checkpoint, hf):
    """A logits processor edits its row in place, after the model: the logits returned are still
    the model's. Its edits came back in generation_logits, and in context_logits' last row alone
    (the rows before it come from the prompt's pass)."""
    engine = engine_of(checkpoint)
    prompt = list(range(30, 51))

    def boost(token):
        def edit(logits):
            logits[..., token] += 100.0
        return edit

    engine.logits_hooks.batched_logits_processor = lambda ids, logits, tokens, stream, clients: \
        [boost(9)(row) for row in logits]
    base = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, return_context_logits=True,
                          return_generation_logits=True)
    for token, how in ((7, {"logits_processor": lambda r, logits, t, s, c: boost(7)(logits)}),
                       (9, {"apply_batched_logits_processor": True})):
        out = run(engine, {"x": (prompt, base.model_copy(update=how))})["x"]
        assert out.outputs[0].token_ids == [token] * 4  # the processor chose them
        with torch.no_grad():
            want = hf(torch.tensor([prompt + [token] * 4])).logits[0]
        torch.testing.assert_close(out.context_logits, want[:len(prompt)], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.outputs[0].generation_logits, want[len(prompt) - 1:-1], atol=1e-4, rtol=1e-4)


def test_stop_strings_end_beams_and_are_cut_from_the_text(checkpoint):
    engine = engine_of(checkpoint)
    free = run(engine, {"a": (PROMPTS[0], SamplingParams(beam_width=3, n=3, max_tokens=8, ignore_eos=True))})["a"]
    text = free.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle of the best beam
    assert stop.strip()
    out = run(engine, {"b": (PROMPTS[0], SamplingParams(beam_width=3, n=3, max_tokens=8, ignore_eos=True,
                                                        stop=[stop]))})["b"]
    assert any(c.finish_reason == "stop" for c in out.outputs)
    for c in out.outputs:
        assert stop not in c.text
        if c.finish_reason == "stop":
            assert c.stop_reason == stop and len(c.token_ids) < 8
    engine.block_manager.check_invariants()


def test_a_beams_stop_token_text_is_left_out_unless_include_stop_str_in_output(checkpoint):
    """As OutputBuilder's rule for a sampled completion: the text ends before the stop token; end_id
    (the request's EOS) gives no stop_reason (TensorRT-LLM's and vLLM's rule)."""
    engine = engine_of(checkpoint)
    params = SamplingParams(beam_width=2, n=2, max_tokens=6, ignore_eos=True)
    free = run(engine, {"a": (PROMPTS[0], params)})["a"].outputs[0]
    tok = engine.tokenizer
    k = next(k for k in range(1, 6) if tok.decode(free.token_ids[k:k + 1]) and free.token_ids.index(free.token_ids[k]) == k)
    stop = free.token_ids[k]
    cases = [({"stop_token_ids": [stop]}, stop), ({"end_id": stop, "ignore_eos": False}, None)]
    for (how, reason), include in itertools.product(cases, (False, True)):
        update = {**how, "include_stop_str_in_output": include}
        out = run(engine, {"b": (PROMPTS[0], params.model_copy(update=update))})["b"]
        stopped = [c for c in out.outputs if c.finish_reason == "stop"]
        assert stopped and all(c.stop_reason == reason and c.token_ids[-1] == stop for c in stopped), update
        for c in stopped:
            ids = c.token_ids if include else c.token_ids[:-1]
            assert c.text == tok.decode(ids, skip_special_tokens=True), (update, c)
    engine.block_manager.check_invariants()


def test_a_stop_string_that_is_a_skipped_special_token_ends_a_beam(checkpoint):
    """As OutputBuilder's rule: "<|im_end|>", left out of the text by skip_special_tokens, is matched
    as its token (it never matched in the text)."""
    from trtllm.runtime.beams import BeamGroup
    tok = engine_of(checkpoint).tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    group = BeamGroup("r", [1, 2], SamplingParams(beam_width=2, max_tokens=8, stop=["<|im_end|>"]), [0], 64, tok)
    assert group._ends([5], end, 1) == ("<|im_end|>", True)
    assert group._ends([5], 6, 1) is None


def test_a_beams_text_keeps_a_sentencepiece_first_space(tmp_path):
    """As a sampled completion's (IncrementalDetokenizer, after the prompt's last tokens): a first
    "▁word" token reads " word", so that prompt + text reads right; decoded without the prompt, a
    beam's text lost the space (and a stop string could not match it)."""
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path, kind="metaspace")
    engine = engine_of(tmp_path)
    tok, prompt = engine.tokenizer, PROMPTS[2]
    out = run(engine, {"a": (prompt, SamplingParams(beam_width=2, n=2, max_tokens=6, ignore_eos=True))})["a"]
    assert all(tok.convert_ids_to_tokens(c.token_ids[0]).startswith("▁") for c in out.outputs)  # what it checks
    for c in out.outputs:
        assert c.text == tok.decode(prompt + c.token_ids)[len(tok.decode(prompt)):]
    stop = out.outputs[0].text[:3]  # the space and what follows it
    cut = run(engine, {"b": (prompt, SamplingParams(beam_width=2, n=2, max_tokens=6, ignore_eos=True, stop=[stop]))})
    stopped = [c for c in cut["b"].outputs if c.stop_reason == stop]
    assert stopped
    for c in stopped:  # cut at the first match in the text as a sampled completion's reads
        whole = tok.decode(prompt + c.token_ids)[len(tok.decode(prompt)):]
        assert whole.index(stop) == len(c.text) and whole.startswith(c.text)


def test_min_tokens_holds_a_beams_stop_strings_off(checkpoint):
    """As OutputBuilder's rule (vLLM's): no stop string (nor a special token's) is looked for in
    the text of the first min_tokens tokens; beams ended at one there, so min_tokens changed
    nothing for them."""
    from trtllm.runtime.beams import BeamGroup
    engine = engine_of(checkpoint)
    params = SamplingParams(beam_width=3, n=3, max_tokens=8, ignore_eos=True)
    free = run(engine, {"a": (PROMPTS[0], params)})["a"]
    stop = free.outputs[0].text[1:3]  # early in the best beam
    cut = run(engine, {"b": (PROMPTS[0], params.model_copy(update={"stop": [stop]}))})["b"]
    assert [c.token_ids for c in cut.outputs] != [c.token_ids for c in free.outputs]  # the stop string acts
    held = run(engine, {"c": (PROMPTS[0], params.model_copy(update={"stop": [stop], "min_tokens": 8}))})["c"]
    assert [(c.token_ids, c.text, c.finish_reason) for c in held.outputs] == \
        [(c.token_ids, c.text, c.finish_reason) for c in free.outputs]
    engine.block_manager.check_invariants()
    # a match that ends in the first min_tokens - 1 tokens' text is never one; one ending after it is
    tok = engine.tokenizer
    x, y, z = (tok.convert_tokens_to_ids(c) for c in "xyz")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    group = BeamGroup("r", [1, 2], SamplingParams(beam_width=2, max_tokens=8, stop=["xy", "<|im_end|>"],
                                                  min_tokens=3), [0], 64, tok)
    assert group._ends([x], y, 1) is None and group._ends([x], end, 1) is None
    assert group._ends([x, y], z, 2) is None
    assert group._ends([x, y, z, x], y, 4) == ("xy", True) and group._ends([x, y, z], end, 3) == ("<|im_end|>", True)
    assert BeamGroup("r", [1, 2], SamplingParams(beam_width=2, max_tokens=8, stop=["xy"], min_tokens=2), [0], 64,
                     tok)._ends([x], y, 1) == ("xy", True)  # its last token completes it: as OutputBuilder's


def test_a_streamed_beam_search_arrives_once_whole(checkpoint):
    from trtllm.runtime.llm import LLM
    params = SamplingParams(beam_width=2, n=2, max_tokens=6, ignore_eos=True)
    with LLM(str(checkpoint), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
             build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64, max_beam_width=2)) as llm:
        whole = llm.generate(PROMPTS[0], params, use_tqdm=False)
        parts = list(llm.generate(PROMPTS[0], params, streaming=True))
    assert len(parts) == 1 and parts[0].finished
    assert [c.token_ids for c in parts[0].outputs] == [c.token_ids for c in whole.outputs]


def test_each_beam_carries_the_generation_logits_of_its_own_tokens(checkpoint, hf):
    engine = engine_of(checkpoint)
    prompt = PROMPTS[1]
    params = beam_params(CASES[0], return_generation_logits=True)
    out = run(engine, {"x": (prompt, params)})["x"]
    for c in out.outputs:
        with torch.no_grad():
            want = hf(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
        assert c.generation_logits.shape == (len(c.token_ids), 512)
        torch.testing.assert_close(c.generation_logits, want, atol=1e-4, rtol=1e-4)

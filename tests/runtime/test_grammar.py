"""Structured output and logits processors (runtime/grammar.py) on a tiny random Llama whose
unconstrained text is never JSON: random JSON schemas (hypothesis) whose outputs all parse and
validate, regexes whose outputs all match, choices always one of them; bad guides refused by
name at submission, the engine unaffected; streaming, stop strings, max_tokens, n > 1,
preemption; TensorRT-LLM's LogitsProcessor and BatchedLogitsProcessor."""
import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.runtime.tokenizers import make_tokenizer
from trtllm import BatchedLogitsProcessor, GuidedDecodingParams, LogitsProcessor
from trtllm.config import BuildConfig, ConfigError, KvCacheConfig
from trtllm.runtime import guides
from trtllm.runtime.llm import LLM
from trtllm.runtime.outputs import RequestError
from trtllm.runtime.sampler import SamplingBatch, apply_token_bitmask
from trtllm.sampling_params import SamplingParams

xgr = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def model_path(checkpoint):
    make_tokenizer(checkpoint)
    return checkpoint


def small_llm(path, max_seq_len=256, kv_tokens=8192, **kw):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=kv_tokens),
               build_config=BuildConfig(max_batch_size=8, max_num_tokens=128, max_seq_len=max_seq_len), **kw)


@pytest.fixture(scope="module")
def llm(model_path):
    with small_llm(model_path) as llm:
        yield llm


def guided(guide: GuidedDecodingParams, max_tokens=240, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": max_tokens, "temperature": 1.0, "guided_decoding": guide, **kw})


# -- random JSON schemas whose every instance is short: bounded strings, ranges, item counts --------
_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.tuples(st.integers(0, 2), st.integers(0, 4)).map(
        lambda t: {"type": "string", "minLength": t[0], "maxLength": t[0] + t[1]}),
    st.lists(st.one_of(st.text("abcxyz é\"", min_size=1, max_size=4), st.integers(-9, 99)),
             min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    st.sampled_from(["[a-z]{1,3}", "[0-9]{2}-[A-Z]", "(ab|cd)+?x?"]).map(
        lambda p: {"type": "string", "pattern": "^" + p + "$"}),
)
_names = st.text("abcdefgh_", min_size=1, max_size=5)


def _extend(children):
    objects = st.dictionaries(_names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req)}))
    arrays = st.tuples(children, st.integers(0, 1), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})
    any_of = st.lists(children, min_size=2, max_size=2).map(lambda v: {"anyOf": v})
    return st.one_of(objects, arrays, any_of)


schemas = st.recursive(_leaf, _extend, max_leaves=5)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**31))
def test_random_json_schemas_always_validate(llm, schema, seed):
    out = llm.generate("Data:", guided(GuidedDecodingParams(json=schema), seed=seed), use_tqdm=False)
    c = out.outputs[0]
    assert c.finish_reason == "stop", (schema, c.text)
    jsonschema.validate(json.loads(c.text), schema)


def test_the_random_model_writes_no_json_unconstrained(llm):
    outs = llm.generate(["Data:"] * 8, [SamplingParams(max_tokens=40, temperature=1.0, seed=s) for s in range(8)],
                        use_tqdm=False)
    for o in outs:
        with pytest.raises(ValueError):
            json.loads(o.outputs[0].text)


# bounded: a random model would otherwise run on to max_tokens inside a `+`
REGEXES = [r"\d{3}-\d{4}", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)", r"(yes|no)( and (yes|no)){0,3}", r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}",
           r"[A-Z][a-z]{2,6} [0-9]{1,2}, 20[0-9]{2}"]


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_outputs_always_match(llm, regex):
    params = [guided(GuidedDecodingParams(regex=regex), max_tokens=200, seed=s) for s in range(6)]
    for o in llm.generate(["Hello"] * 6, params, use_tqdm=False):
        c = o.outputs[0]
        assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), (regex, c.text)
        assert re.fullmatch(regex, c.text) is not None


def test_choice_is_always_one_of_them_and_grammar_holds(llm):
    choices = ["Paris", "London", "New \"York\"", "東京"]
    outs = llm.generate(["The capital:"] * 8, [guided(GuidedDecodingParams(choice=choices), seed=s) for s in range(8)],
                        use_tqdm=False)
    assert {o.outputs[0].text for o in outs} <= set(choices)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    ebnf = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z] | [0-9]+'
    for o in llm.generate(["x"] * 4, [guided(GuidedDecodingParams(grammar=ebnf), seed=s) for s in range(4)],
                          use_tqdm=False):
        assert re.fullmatch(r"\(([a-z]|[0-9]+)(,([a-z]|[0-9]+))*\)", o.outputs[0].text), o.outputs[0].text


def test_characters_below_256_followed_by_hex_digits(llm):
    # xgrammar 0.2.9 prints "é" as \xe9 and reads "\xe9a" back as U+0E9A: an enum ["éa"] gave "ບ"
    for guide, allowed in ((GuidedDecodingParams(json={"enum": ["éa", "ÿf", "\u0001b"]}), {"éa", "ÿf", "\u0001b"}),
                           (GuidedDecodingParams(choice=["éa", "ÿf", "x\u0001a"]), {"éa", "ÿf", "x\u0001a"})):
        outs = llm.generate(["x"] * 8, [guided(guide, max_tokens=20, seed=s) for s in range(8)], use_tqdm=False)
        texts = {json.loads(o.outputs[0].text) if guide.kind == "json" else o.outputs[0].text for o in outs}
        assert texts <= allowed and len(texts) > 1


def test_structural_tag(llm):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<fn>", "end": "</fn>",
                                                "content": {"type": "json_schema", "json_schema": schema}}}
    out = llm.generate("x", guided(GuidedDecodingParams(structural_tag=json.dumps(tag)), max_tokens=60, seed=3),
                       use_tqdm=False).outputs[0]
    m = re.fullmatch(r"<fn>(.*)</fn>", out.text, re.DOTALL)
    assert m is not None and out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(m.group(1)), schema)


def test_json_object_and_n_and_greedy(llm):
    out = llm.generate("x", guided(GuidedDecodingParams(json_object=True), n=3, seed=4), use_tqdm=False)
    for c in out.outputs:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict)
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"]}
    params = SamplingParams(max_tokens=50, temperature=0.0, guided_decoding=GuidedDecodingParams(json=schema))
    texts = {llm.generate("x", params, use_tqdm=False).outputs[0].text for _ in range(2)}
    assert len(texts) == 1 and json.loads(texts.pop())["k"] in ("a", "b")


def test_guided_rows_leave_their_batch_mates_alone(llm):
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate(["Hello", "Once"], plain, use_tqdm=False)
    mixed = llm.generate(["Hello", "Data:", "Once"], [plain, guided(GuidedDecodingParams(regex="[ab]{30}")), plain],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.outputs[0].token_ids for o in alone]
    assert re.fullmatch("[ab]{30}", mixed[1].outputs[0].text)


def test_streaming_stop_strings_and_max_tokens(llm):
    params = guided(GuidedDecodingParams(regex="[a-c]{40}"), seed=1)
    pieces, last = [], None
    for out in llm.generate("Hi", params, streaming=True):
        pieces.append(out.outputs[0].text_diff)
        last = out
    assert "".join(pieces) == last.outputs[0].text and re.fullmatch("[a-c]{40}", last.outputs[0].text)
    assert len(pieces) > 2
    cut = llm.generate("Hi", guided(GuidedDecodingParams(regex="(ab|c)+x"), max_tokens=20, seed=2), use_tqdm=False)
    assert cut.outputs[0].finish_reason in ("length", "stop")
    assert len(cut.outputs[0].token_ids) <= 20
    assert re.fullmatch("(ab|c)+x?", cut.outputs[0].text)
    short = llm.generate("Hi", guided(GuidedDecodingParams(regex="[ab]{30}"), max_tokens=5), use_tqdm=False)
    assert short.outputs[0].finish_reason == "length" and len(short.outputs[0].token_ids) == 5
    stopped = llm.generate("Hi", guided(GuidedDecodingParams(regex="a{5}b{20}"), stop=["ab"]), use_tqdm=False)
    assert stopped.outputs[0].text == "aaaa" and stopped.outputs[0].finish_reason == "stop"


def test_grammars_compile_once_per_guide(llm):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"]}
    hooks = llm.engine.logits_hooks
    before = len(hooks.compiled)
    for _ in range(3):
        llm.generate("x", guided(GuidedDecodingParams(json=json.dumps(schema)), max_tokens=60), use_tqdm=False)
    llm.generate("x", guided(GuidedDecodingParams(json=schema), max_tokens=60), use_tqdm=False)
    assert len(hooks.compiled) == before + 1


@pytest.mark.parametrize("guide, message", [
    (dict(json={"type": "strin"}), r"guided_decoding.json: .*strin"),
    (dict(json={"type": "object", "properties": 3}), r"guided_decoding.json: not a valid JSON Schema"),
    (dict(regex="a(b"), r"guided_decoding.regex: .*parenthesis"),
    (dict(grammar='root ::= foo'), r"guided_decoding.grammar: .*foo"),
])
def test_bad_guides_are_refused_at_submission(llm, guide, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("x", guided(GuidedDecodingParams(**guide)), use_tqdm=False)
    assert llm.generate("x", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False).outputs[0].token_ids


def test_guide_shape_errors_name_the_field():
    with pytest.raises(ConfigError, match="exactly one guide must be given, got 2"):
        GuidedDecodingParams(regex="a", choice=["b"])
    with pytest.raises(ConfigError, match=r"GuidedDecodingParams.json='\{x': not valid JSON text"):
        GuidedDecodingParams(json="{x")
    with pytest.raises(ConfigError, match="min_tokens with guided_decoding is not supported"):
        SamplingParams(min_tokens=1, guided_decoding=GuidedDecodingParams(regex="a"))


def test_without_xgrammar_guided_requests_are_refused_by_name(llm, monkeypatch):
    def missing():
        raise ValueError(guides.XGRAMMAR_MISSING)
    monkeypatch.setattr(guides, "xgrammar_module", missing)
    with pytest.raises(ValueError, match=r"needs the xgrammar package.*trtllm\[guided\]"):
        llm.generate("x", guided(GuidedDecodingParams(regex="[ab]+z")), use_tqdm=False)
    assert llm.generate("x", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False).outputs[0].token_ids


def test_guided_under_preemption(model_path):
    # 8 blocks of 16 tokens for 4 sequences that grow to ~40 tokens: some are preempted and recomputed
    with small_llm(model_path, max_seq_len=64, kv_tokens=128) as small:
        params = [guided(GuidedDecodingParams(regex="[a-d]{30}"), max_tokens=40, seed=s) for s in range(4)]
        outs = small.generate(["Hello there"] * 4, params, use_tqdm=False)
        assert all(re.fullmatch("[a-d]{30}", o.outputs[0].text) for o in outs)
        assert small.engine_stats().num_preemptions > 0
        small.block_manager.check_invariants()


# -- logits processors ---------------------------------------------------------------------------------
class OnlyToken(LogitsProcessor):
    def __init__(self, token):
        self.token, self.calls = token, []

    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id):
        assert logits.shape[:2] == (1, 1) and len(token_ids) == 1 and client_id is None
        self.calls.append((req_id, len(token_ids[0])))
        logits[:] = float("-inf")
        logits[..., self.token] = 0.0


def test_logits_processor_edits_its_row_only(llm):
    proc = OnlyToken(77)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = llm.generate("Hello", plain, use_tqdm=False).outputs[0].token_ids
    outs = llm.generate(["Once", "Hello"], [SamplingParams(max_tokens=6, logits_processor=proc, ignore_eos=True), plain],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [77] * 6
    assert outs[1].outputs[0].token_ids == alone
    prompt_len = len(outs[0].prompt_token_ids)
    assert [n for _, n in proc.calls] == list(range(prompt_len, prompt_len + 6))
    assert {r for r, _ in proc.calls} == {outs[0].request_id}


def test_a_list_of_processors_runs_in_order_and_a_plain_callable_works(llm):
    def ban_77(req_id, logits, token_ids, stream_ptr, client_id):
        logits[..., 77] = float("-inf")
    params = SamplingParams(max_tokens=4, logits_processor=[OnlyToken(77), lambda r, lg, t, s, c: lg.__setitem__(
        (Ellipsis, 78), 1.0)], temperature=0.0, ignore_eos=True)
    assert llm.generate("x", params, use_tqdm=False).outputs[0].token_ids == [78] * 4
    with pytest.raises(ConfigError, match="logits_processor"):
        SamplingParams(logits_processor="not callable")


def test_a_raising_processor_fails_its_request_alone(llm):
    def boom(*args):
        raise RuntimeError("user bug")
    plain = SamplingParams(max_tokens=4, ignore_eos=True)
    streams = [llm.generate("x", SamplingParams(max_tokens=4, logits_processor=boom), streaming=True),
               llm.generate("y", plain, streaming=True)]
    with pytest.raises(RequestError, match="the logits processor raised RuntimeError: user bug"):
        list(streams[0])
    assert len(list(streams[1])[-1].outputs[0].token_ids) == 4


def test_batched_logits_processor(model_path):
    class Ban(BatchedLogitsProcessor):
        def __init__(self):
            self.batches = []

        def __call__(self, req_ids, logits, token_ids, stream_ptr, client_ids):
            self.batches.append(len(req_ids))
            for row in logits:
                row[..., :100] = float("-inf")
    ban = Ban()
    with small_llm(model_path, max_seq_len=64, batched_logits_processor=ban) as b:
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, apply_batched_logits_processor=True)
        outs = b.generate(["a", "b", "c"], params, use_tqdm=False)
        assert all(t >= 100 for o in outs for t in o.outputs[0].token_ids)
        assert max(ban.batches) == 3
    with small_llm(model_path, max_seq_len=64) as b, pytest.raises(ValueError, match="no batched_logits_processor"):
        b.generate("a", params, use_tqdm=False)


def test_apply_token_bitmask_matches_a_boolean_mask():
    g = torch.Generator().manual_seed(0)
    n, V = 3, 70
    allowed = torch.rand(n, V, generator=g) < 0.3
    words = torch.zeros(n, (V + 31) // 32, dtype=torch.int64)
    for t in range(V):
        words[:, t // 32] |= allowed[:, t].long() << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as xgrammar stores them
    logits = torch.randn(n, V, generator=g)
    batch = SamplingBatch.build([], V, "cpu", [])
    batch.token_bitmask = bitmask
    out = apply_token_bitmask(logits, batch)
    assert torch.equal(out, logits.masked_fill(~allowed, float("-inf")))


# -- the overlap scheduler and the decode graphs' own picks (their CPU stand-ins) -------------------------
def graph_llm(path, overlap: bool) -> LLM:
    from tests.runtime.test_model_runner import EagerGraph
    from trtllm.models.loader import load_model
    from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes
    from trtllm.runtime.tokenizer import load_tokenizer
    llm = LLM(load_model(path, dtype=torch.float32, device="cpu"), tokenizer=load_tokenizer(path),
              kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=2048),
              build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=128),
              disable_overlap_scheduler=not overlap)
    runner = llm.engine.runner
    for b in cuda_graph_batch_sizes(runner.meta.max_num_seqs):
        g = EagerGraph(runner, b, 512)
        runner.cuda_graphs.decode[b] = (g, g.logits, g.greedy)
    return llm


def test_guided_greedy_rows_keep_the_graphs_and_the_overlap_scheduler(model_path, llm):
    """Greedy guided rows take the decode graphs' picks re-made under their masks, and the
    overlap scheduler launches steps ahead from them; a row with a processor goes through the
    sampler. Joining at once or while steps run ahead: the same outputs as the plain engine's."""
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    regex = guided(GuidedDecodingParams(regex="[xyz]{12}"), max_tokens=40, temperature=0.0)
    forced = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logits_processor=OnlyToken(33))
    prompts, params = ["Hello", "Once", "Data:", "x"], [plain, regex, plain, forced]
    results = []
    for overlap in (False, True):
        with graph_llm(model_path, overlap) as g:
            ahead = []
            real = g.engine.runner.execute_ahead
            g.engine.runner.execute_ahead = lambda *a, real=real, ahead=ahead: ahead.append(1) or real(*a)
            outs = [o.outputs[0].token_ids for o in g.generate(prompts, params, use_tqdm=False)]
            # a guided request joining greedy streams that run ahead
            stream = g.generate("Hello", plain, streaming=True)
            first = next(stream)
            late = g.generate("Data:", regex, use_tqdm=False)
            rest = list(stream)
            del ahead[:]
            only = g.generate(["Data:", "Hello", "x"], regex, use_tqdm=False)  # all guided, all greedy
            results.append((outs, late.outputs[0].text, rest[-1].outputs[0].token_ids,
                            [o.outputs[0].text for o in only]))
            assert len(ahead) >= (8 if overlap else 0) and len(first.outputs[0].token_ids) >= 1
            g.block_manager.check_invariants()
    assert results[0] == results[1]
    outs, late_text, _, only = results[1]
    assert re.fullmatch("[xyz]{12}", late_text) and outs[3] == [33] * 6
    assert all(re.fullmatch("[xyz]{12}", t) for t in only)
    # the sampler's path (no graphs) picks the same tokens
    assert [o.outputs[0].text for o in llm.generate(["Data:", "Hello", "x"], regex, use_tqdm=False)] == only

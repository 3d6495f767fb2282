"""LoRA end to end on a tiny random Llama checkpoint (fp32), adapters written by `peft` with random
non-zero weights: greedy output with an adapter equals peft's model with it; a batch mixing the
base and adapters of different ranks and targets gives each request its solo tokens, also with
fewer GPU slots than adapters (eviction); prefix-cache blocks never cross adapters; bad adapters
are refused at submission by name, and the engine goes on."""
import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.lora_adapters import peft_greedy, write_adapter
from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig, LoraConfig, LoRARequest, SamplingParams
from trtllm.runtime.outputs import RequestError

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9]]
NEW = 8
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (rank, targets, extra peft options): ranks 4, 8, 16; attention only, everything (rsLoRA), MLP only
ADAPTERS = {"attn4": (4, ("q_proj", "v_proj"), {}),
            "all8": (8, ALL, {"use_rslora": True}),
            "mlp16": (16, ("gate_proj", "up_proj", "down_proj"), {})}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora_base")
    write_checkpoint("llama31", path, vocab_size=512)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """name -> (LoRARequest, the peft model with it)."""
    out = {}
    for i, (name, (r, targets, options)) in enumerate(ADAPTERS.items(), start=1):
        path = tmp_path_factory.mktemp(name)
        out[name] = (LoRARequest(name, i, str(path)), write_adapter(base, path, r=r, targets=targets, seed=i,
                                                                    **options))
    return out


def lora_llm(base, **lora):
    return LLM(str(base), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
               build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64),
               lora_config=LoraConfig(**{"max_lora_rank": 16, "max_loras": 4, **lora}))


def greedy(llm, prompts, lora_request=None, new=NEW):
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)]


@pytest.fixture(scope="module")
def llm(base):
    with lora_llm(base) as llm:
        yield llm


def test_greedy_with_an_adapter_equals_peft(llm, base, adapters):
    base_tokens = [peft_greedy(hf_model(base), p, NEW) for p in PROMPTS]
    assert greedy(llm, PROMPTS) == base_tokens
    for name, (request, peft_model) in adapters.items():
        want = [peft_greedy(peft_model, p, NEW) for p in PROMPTS]
        assert want != base_tokens, f"{name} changes nothing: the test could not fail"
        assert greedy(llm, PROMPTS, request) == want, name
    assert lora_ops(llm) == (8, 0)  # 4 GEMMs (fused qkv, o, fused gate-up, down) x 2 layers, fused
    assert llm.engine.runner.prefill_graphs_serve()  # (a CPU captures none: test_prefill_graphs_...)


def test_steps_without_adapters_launch_no_adapter_kernels(llm, adapters, monkeypatch):
    """A step in which no token has an adapter runs inside no_adapters() (kernels/linear_lora.py): the fused
    LoRA linears launch the base linear alone (on a GPU, the decode graphs captured that way)."""
    import trtllm.kernels.linear_lora as linear_lora
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the launchers, not the references (tests/runtime/conftest.py)
    calls = []
    for name in ("lora_shrink_partials", "lora_shrink_triton"):  # every adapter path of the op starts with one
        real = getattr(linear_lora, name)
        monkeypatch.setattr(linear_lora, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    base_tokens = greedy(llm, PROMPTS)
    assert not calls
    request, _ = adapters["all8"]
    assert greedy(llm, PROMPTS[:1], request) != base_tokens[:1] and calls


def lora_ops(llm) -> tuple[int, int]:
    """(LoRA linears fused into trtllm.linear_lora, unfused shrink + expand pairs) in the first
    compiled graph."""
    targets = [n.target for n in llm.compiled.graphs[0].graph.nodes if n.op == "call_function"]
    unfused = targets.count(torch.ops.trtllm.lora_shrink.default)
    assert unfused == targets.count(torch.ops.trtllm.lora_expand.default)
    return targets.count(torch.ops.trtllm.linear_lora.default), unfused


def _mixed(adapters, prompts=PROMPTS):
    """Every prompt under the base and each adapter, interleaved."""
    requests = [None] + [request for request, _ in adapters.values()]
    pairs = [(p, requests[(i + j) % len(requests)]) for i, p in enumerate(prompts) for j in range(len(requests))]
    return [p for p, _ in pairs], [r for _, r in pairs]


def test_a_mixed_batch_gives_each_request_its_solo_tokens(llm, adapters):
    prompts, requests = _mixed(adapters)
    solo = [greedy(llm, [p], r)[0] for p, r in zip(prompts, requests)]
    assert greedy(llm, prompts, requests) == solo


@pytest.mark.parametrize("interpret", [False, True], ids=["reference", "triton-interpreter"])
def test_prefill_graphs_refill_each_tokens_adapter_slot(base, adapters, interpret, monkeypatch):
    """Steps of several tokens a sequence replayed from prefill graphs (the CPU stand-ins of
    tests/runtime/test_model_runner.py) with adapters and the base in one step, whole and
    chunked: each request gets peft's tokens; the graphs' padding tokens have no slot."""
    from tests.runtime.test_model_runner import add_prefill_graphs
    if interpret:  # the LoRA kernels, not the references, under a graph's padded bounds
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # interpreted (261 s with all of it): the chunked engine alone, a short and a 21-token prompt,
    # the prefill's token and one decode step's
    prompts, requests = _mixed(adapters, [PROMPTS[0], PROMPTS[2]] if interpret else PROMPTS)
    new = 2 if interpret else NEW
    want = [peft_greedy(hf_model(base) if r is None else adapters[r.lora_name][1], p, new)
            for p, r in zip(prompts, requests)]
    seen = []  # (graph tokens, its slots) at each replay: past the step's tokens, padding, -1
    for max_num_tokens in (16,) if interpret else (64, 16):
        with LLM(str(base), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
                 build_config=BuildConfig(max_batch_size=8, max_num_tokens=max_num_tokens, max_seq_len=64),
                 lora_config=LoraConfig(max_lora_rank=16, max_loras=4)) as llm:
            graphs = add_prefill_graphs(llm, max_num_tokens)
            slots = llm.engine.adapters.slots.slot_ids
            for g in graphs.values():
                real = g.replay
                g.replay = lambda g=g, real=real, slots=slots: (seen.append((g.tokens, slots[:g.tokens].tolist())),
                                                                 real())[1]
            assert greedy(llm, prompts, requests, new) == want
            assert any(g.replays for g in graphs.values())
            assert any(s >= 0 for _, row in seen for s in row), "no replay had an adapter: the test could not fail"
            llm.block_manager.check_invariants()
    assert any(row[-1] == -1 for _, row in seen)


def test_more_adapters_than_slots_evicts_and_still_matches(base, adapters):
    prompts, requests = _mixed(adapters)
    with lora_llm(base) as roomy:
        solo = [greedy(roomy, [p], r)[0] for p, r in zip(prompts, requests)]
    with lora_llm(base, max_loras=1, max_cpu_loras=2) as tight:
        assert greedy(tight, prompts, requests) == solo
        cache = tight.engine.adapters
        # each adapter loaded once into the one slot (two evictions): while one waits for the
        # slot, the requests of the resident adapter pass it (runtime/admission.py, Admission.next_waiting)
        assert cache.slot_loads == len(adapters)
        assert len(cache.cached) == 2 and len(cache.resident) == 1
        tight.block_manager.check_invariants()


def test_prefix_blocks_are_never_shared_across_adapters(llm, adapters):
    prompt = list(range(100, 140))  # two full blocks of 16 before the last token
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    first, second = adapters["attn4"][0], adapters["mlp16"][0]
    solo = {}
    for request in (None, first, second):
        out = llm.generate(prompt, params, lora_request=request)
        solo[request] = out.outputs[0].token_ids
    for request in (None, first, second):  # again: each finds its own blocks, no one else's
        out = llm.generate(prompt, params, lora_request=request)
        assert out.num_cached_tokens == 32
        assert out.outputs[0].token_ids == solo[request]
    assert len(set(map(tuple, solo.values()))) == 3
    # a fresh prefix under one adapter: not found under the base or another adapter
    fresh = list(range(200, 240))
    llm.generate(fresh, params, lora_request=first)
    for request in (None, second):
        assert llm.generate(fresh, params, lora_request=request).num_cached_tokens == 0
    assert llm.generate(fresh, params, lora_request=first).num_cached_tokens == 32


def test_generate_async_takes_a_lora_request(llm, adapters):
    request, peft_model = adapters["all8"]

    async def run():
        stream = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
                                    lora_request=request)
        return (await stream.aresult()).outputs[0].token_ids

    assert asyncio.run(run()) == peft_greedy(peft_model, PROMPTS[0], NEW)


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_bad_adapters_are_refused_at_submission_by_name(llm, base, adapters, tmp_path):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def refused(request, why):
        with pytest.raises(ValueError, match=why):
            llm.generate([[1, 2, 3]], params, lora_request=request, use_tqdm=False)

    refused(LoRARequest("gone", 50, str(tmp_path / "missing")), r"'gone' .*no such directory")
    write_adapter(base, tmp_path / "r32", r=32, seed=3)
    refused(LoRARequest("big", 51, str(tmp_path / "r32")), "rank r=32 exceeds max_lora_rank=16")
    write_adapter(base, tmp_path / "head", r=4, targets=("q_proj", "lm_head"), seed=4)
    refused(LoRARequest("head", 52, str(tmp_path / "head")), "LM-head and embedding adapters are not supported")
    write_adapter(base, tmp_path / "dora", r=4, targets=("q_proj",), seed=5, use_dora=True)
    refused(LoRARequest("dora", 53, str(tmp_path / "dora")), "DoRA")
    write_adapter(base, tmp_path / "bias", r=4, targets=("q_proj",), seed=6, bias="lora_only")
    refused(LoRARequest("bias", 54, str(tmp_path / "bias")), "bias='lora_only'")
    other = tmp_path / "other_base"
    write_checkpoint("llama31", other, vocab_size=512, hidden_size=32, intermediate_size=64)
    write_adapter(other, tmp_path / "other", r=4, seed=7)
    refused(LoRARequest("other", 55, str(tmp_path / "other")),
            r"down_proj has lora_A \[4, 64\] and lora_B \[32, 4\], but the base model.s linear there is 128 -> 64")
    request = adapters["attn4"][0]
    with pytest.raises(ValueError, match=r"lora_int_id must be an integer from 1 to 2\*\*64 - 1"):
        LoRARequest("zero", 0, str(tmp_path))
    # the engine goes on, and a good adapter in the same batch as a bad one: none of the batch runs
    with pytest.raises(ValueError, match="^prompt 1: .*no such directory"):
        llm.generate([[1, 2], [3, 4]], params, use_tqdm=False,
                     lora_request=[request, LoRARequest("gone", 50, str(tmp_path / "missing"))])
    assert not llm.has_unfinished()
    assert greedy(llm, PROMPTS[:1], request) == [peft_greedy(adapters["attn4"][1], PROMPTS[0], NEW)]
    refused(LoRARequest("clash", request.lora_int_id, str(tmp_path / "r32")), "needs an id of its own")


def test_corrupt_adapter_files_are_refused_by_name(llm, base, adapters, tmp_path):
    """A truncated weights file, integer weights or a config that is no JSON object: refused at
    submission; NaN weights when first read (the request fails naming the tensor). The engine
    serves on, a good adapter gives its tokens, no block leaks."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def broken(name, edit):
        write_adapter(base, tmp_path / name, r=4, targets=("q_proj",), seed=8)
        edit(tmp_path / name)
        return LoRARequest(name, 60 + len(list(tmp_path.iterdir())), str(tmp_path / name))

    weights = "adapter_model.safetensors"
    truncate = lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:100])  # noqa: E731
    retype = lambda d: save_file({k: (v * 100).to(torch.int32) for k, v in load_file(d / weights).items()},  # noqa: E731
                                 str(d / weights))
    poison = lambda d: save_file({k: v.fill_(float("nan")) if "lora_A" in k else v  # noqa: E731
                                  for k, v in load_file(d / weights).items()}, str(d / weights))
    for request, why in [(broken("cut", truncate), "'cut' .*is not a readable safetensors file"),
                         (broken("int", retype), r"'int' .*lora_A\.weight is I32: LoRA weights must be floating point"),
                         (broken("list", lambda d: (d / "adapter_config.json").write_text("[1, 2]")),
                          "'list' .*adapter_config.json holds a list, not a JSON object")]:
        with pytest.raises(ValueError, match=why):
            llm.generate([[1, 2, 3]], params, lora_request=request, use_tqdm=False)
    with pytest.raises(RequestError, match=r"'nan' .*could not be read: .*lora_A\.weight holds NaN or Inf"):
        llm.generate([[1, 2, 3]], params, lora_request=broken("nan", poison), use_tqdm=False)
    assert not llm.has_unfinished()
    request, peft_model = adapters["attn4"]
    assert greedy(llm, PROMPTS[:1], request) == [peft_greedy(peft_model, PROMPTS[0], NEW)]
    llm.block_manager.check_invariants()


def test_a_config_that_disagrees_with_its_weights_is_refused(llm, base, tmp_path):
    """Weights for modules the adapter's own config does not target (PEFT would leave them out):
    refused by name, not applied. Adapters PEFT itself writes with layers_to_transform (and a
    layers_pattern) or a regular expression pass and give PEFT's tokens."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def written(name, edit=None, **options):
        peft_model = write_adapter(base, tmp_path / name, r=4, seed=11, **options)
        if edit:
            _edit_config(tmp_path / name, **edit)
        return LoRARequest(name, 70 + len(list(tmp_path.iterdir())), str(tmp_path / name)), peft_model

    for name, options, edit, why in [
            ("fewer", dict(targets=("q_proj", "v_proj")), dict(target_modules=["q_proj"]),
             r"self_attn.v_proj has LoRA weights, but adapter_config.json's target_modules \['q_proj'\] leaves it out"),
            ("layer0", dict(targets=("q_proj",)), dict(layers_to_transform=[0]),
             r"layers.1.self_attn.q_proj has LoRA weights, but .*layers_to_transform \[0\] leaves it out"),
            ("excluded", dict(targets=("q_proj", "v_proj")), dict(exclude_modules=["v_proj"]),
             r"v_proj has LoRA weights, but .*exclude_modules \['v_proj'\] leaves it out"),
            ("regex", dict(targets=("q_proj", "v_proj")), dict(target_modules=r".*\.q_proj"),
             r"v_proj has LoRA weights, but .*target_modules '\.\*\\\\.q_proj' leaves it out")]:
        request, _ = written(name, edit, **options)
        with pytest.raises(ValueError, match=why):
            llm.generate([[1, 2, 3]], params, lora_request=request, use_tqdm=False)
    for name, options in [("only1", dict(targets=("q_proj", "down_proj"), layers_to_transform=[1])),
                          ("pattern", dict(targets=("v_proj",), layers_to_transform=1, layers_pattern="layers")),
                          ("re", dict(targets=r"model\.layers\.0\.self_attn\.(q|k)_proj"))]:
        request, peft_model = written(name, **options)
        assert greedy(llm, PROMPTS[:1], request) == [peft_greedy(peft_model, PROMPTS[0], NEW)], name
    assert not llm.has_unfinished()
    llm.block_manager.check_invariants()


def test_target_modules_the_engine_does_not_wrap_are_refused(base, adapters, tmp_path):
    with lora_llm(base, lora_target_modules=["attn_q", "attn_k"]) as llm:  # TensorRT-LLM's names
        assert lora_ops(llm) == (2, 0)  # the q/k part of each fused QKV
        request = adapters["attn4"][0]  # q and v
        with pytest.raises(ValueError, match=r"targets model.layers.0.self_attn.v_proj: this engine wraps no"):
            llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=request)
        write_adapter(base, tmp_path / "q", r=4, targets=("q_proj",), seed=9)
        q_only = LoRARequest("q", 9, str(tmp_path / "q"))
        peft_model = write_adapter(base, tmp_path / "q", r=4, targets=("q_proj",), seed=9)
        assert greedy(llm, PROMPTS[:2], q_only) == [peft_greedy(peft_model, p, NEW) for p in PROMPTS[:2]]


def test_an_hf_module_family_takes_adapters_by_their_own_paths(tmp_path, monkeypatch):
    # OLMo-2 has no model file of ours: transformers' module compiles inside models/hf.py's HFCausalLM,
    # its linears at `model.` + the paths peft names (LoraSlots.module_path); refused as "no such linear" before
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' references: an engine of another family
    path = write_checkpoint("olmo2", tmp_path / "olmo2", vocab_size=512)
    make_tokenizer(path)
    peft_model = write_adapter(path, tmp_path / "adapter", r=8, targets=("q_proj", "v_proj", "down_proj"), seed=3)
    with lora_llm(path) as llm:
        assert llm.compiled.lora.module_path("model.layers.0.mlp.down_proj") == "model.model.layers.0.mlp.down_proj"
        got = greedy(llm, PROMPTS[:2], LoRARequest("olmo", 1, str(tmp_path / "adapter")))
    want = [peft_greedy(peft_model, p, NEW) for p in PROMPTS[:2]]
    assert want != [peft_greedy(hf_model(path), p, NEW) for p in PROMPTS[:2]]
    assert got == want


def test_beam_search_with_an_adapter_equals_peft_generate(base, adapters):
    # every beam of a group runs under the request's adapter (the scheduler pins it once a beam)
    request, peft_model = adapters["all8"]
    params = SamplingParams(beam_width=3, n=2, max_tokens=NEW, ignore_eos=True)
    with LLM(str(base), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64, max_beam_width=3),
             lora_config=LoraConfig(max_lora_rank=16, max_loras=1)) as llm:
        outs = llm.generate(PROMPTS[:2] + PROMPTS[:1], params, use_tqdm=False, lora_request=[request, request, None])
        assert llm.engine.adapters._pins[request.lora_int_id] == 0  # every beam's pin released
        llm.block_manager.check_invariants()

    def beams(model, prompt):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW,
                                 num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=False)
        return out[:, len(prompt):].tolist()
    want = [beams(peft_model, PROMPTS[0]), beams(peft_model, PROMPTS[1]), beams(hf_model(base), PROMPTS[0])]
    assert want[0] != want[2], "the adapter changes no beam: the test could not fail"
    assert [[c.token_ids for c in out.outputs] for out in outs] == want


def test_phi3_fused_projections_take_adapters_by_default(tmp_path, monkeypatch):
    # qkv_proj and gate_up_proj are among the default targets (TensorRT-LLM's attn_qkv names the first)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = write_checkpoint("phi3", tmp_path / "phi3", vocab_size=512)
    make_tokenizer(path)
    peft_model = write_adapter(path, tmp_path / "adapter", r=8, targets=("qkv_proj", "gate_up_proj"), seed=2)
    with lora_llm(path) as llm:
        got = greedy(llm, PROMPTS[:2], LoRARequest("phi", 1, str(tmp_path / "adapter")))
    want = [peft_greedy(peft_model, p, NEW) for p in PROMPTS[:2]]
    assert want != [peft_greedy(hf_model(path), p, NEW) for p in PROMPTS[:2]]
    assert got == want


def test_speculation_with_adapters_gives_peft_tokens(base, adapters, monkeypatch):
    # n-gram drafts verified by the target under each token's adapter (and the base for others)
    from trtllm import NGramDecodingConfig
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    request, peft_model = adapters["all8"]
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [400, 2, 400, 2, 400, 2]]
    with LLM(str(base), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64),
             lora_config=LoraConfig(max_lora_rank=16), speculative_config=NGramDecodingConfig(max_draft_len=3)) as llm:
        got = greedy(llm, prompts * 2, [request] * 2 + [None] * 2)
        assert vars(llm.engine_stats())["spec_accepted_tokens"] > 0
    assert got == [peft_greedy(peft_model, p, NEW) for p in prompts] + [peft_greedy(hf_model(base), p, NEW)
                                                                        for p in prompts]


def test_lora_requests_need_a_lora_config(base):
    with LLM(str(base), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
             build_config=BuildConfig(max_batch_size=2, max_num_tokens=32, max_seq_len=64)) as llm:
        with pytest.raises(ValueError, match="built without lora_config"):
            llm.generate([1, 2], SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, str(base)))


def test_lora_config_refuses_unknown_target_modules():
    with pytest.raises(ValueError, match="unknown target module"):
        LoraConfig(lora_target_modules=["qkv"])
    with pytest.raises(ValueError, match="max_loras"):
        LoraConfig(max_loras=0)


def test_kernels_are_the_peft_formula_on_the_compiled_model(llm, adapters):
    # the pass's wiring alone, whole sequences: slot 0 holds an adapter, slot ids name it per token
    request, peft_model = adapters["all8"]
    engine = llm.engine
    slots = engine.adapters.slots
    ids = torch.tensor([PROMPTS[2][:10], PROMPTS[2][5:15]])
    assert not engine.has_unfinished()
    from trtllm.runtime.adapters import read_peft_weights
    weights = read_peft_weights(engine.adapters.check(request), torch.float32)
    spare = slots.max_loras - 1
    saved = [(g.lora_a[spare].clone(), g.lora_b[spare].clone()) for g in slots.groups.values()]
    try:
        slots.load(spare, weights)
        slots.slot_ids[:10] = spare  # the first sequence under the adapter, the second under the base
        slots.slot_ids[10:20] = -1
        logits = llm.compiled(ids, torch.arange(10).expand(2, 10))
    finally:
        slots.slot_ids.fill_(-1)
        for g, (a, b) in zip(slots.groups.values(), saved):
            g.lora_a[spare], g.lora_b[spare] = a, b
    with torch.no_grad():
        want_lora = peft_model(ids[:1]).logits
        with peft_model.disable_adapter():
            want_base = peft_model(ids[1:]).logits
    torch.testing.assert_close(logits[:1], want_lora, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1:], want_base, atol=1e-4, rtol=1e-4)


def test_pinned_slots_are_never_evicted_and_lru_goes_first(llm, adapters):
    from trtllm.lora_slots import LoraSlots
    from trtllm.runtime.adapters import Adapters
    from trtllm.runtime.sequence import Sequence

    engine_slots = llm.engine.adapters.slots  # the same groups, in slots of their own (the engine's stay as they are)
    slots = LoraSlots(2, 16, ALL, 16, "cpu")
    for group in engine_slots.groups.values():
        slots.group(list(group.parts), group.in_features, group.out_features, group.lora_a.dtype)
    cache = Adapters(LoraConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=2), slots, torch.float32)
    a, b, c = (adapters[name][0] for name in ADAPTERS)
    seq = {name: Sequence(name, [1, 2], SamplingParams(), lora_request=r)
           for name, r in (("a", a), ("a2", a), ("b", b), ("c", c), ("base", None))}
    for name in ("a", "b"):
        assert cache.can_admit(seq[name])
        cache.acquire(seq[name])
    assert cache.slot(seq["a"]) != cache.slot(seq["b"]) and cache.slot(seq["base"]) == -1
    assert not cache.can_admit(seq["c"])  # both slots pinned by running sequences
    assert cache.can_admit(seq["a2"]) and cache.can_admit(seq["base"])  # resident, or no adapter
    assert cache.none_admissible([seq["c"]])  # the overlap scheduler may plan ahead meanwhile
    assert not cache.none_admissible([seq["c"], seq["a2"]]) and not cache.none_admissible([seq["base"]])
    with pytest.raises(RuntimeError, match="pinned"):
        cache.acquire(seq["c"])
    cache.acquire(seq["a2"])
    cache.release(seq["a"])
    assert not cache.can_admit(seq["c"])  # a is still pinned by a2
    b_slot = cache.slot(seq["b"])
    cache.release(seq["b"])
    cache.release(seq["b"])  # twice: no effect
    assert cache.can_admit(seq["c"]) and not cache.none_admissible([seq["c"]])
    cache.acquire(seq["c"])  # takes b's slot, the only unpinned one
    assert cache.slot(seq["c"]) == b_slot and cache.slot(seq["a2"]) != b_slot
    assert cache.resident == [a.lora_int_id, c.lora_int_id] and cache.cached == [b.lora_int_id, c.lora_int_id]
    # the slot holds c's weights now: its gate_proj A in gate_proj's rows of the fused gate-up A
    group, i = slots.modules["model.layers.0.mlp.gate_proj"]
    want = read_weights(cache, c)["model.layers.0.mlp.gate_proj"][0]
    torch.testing.assert_close(group.lora_a[b_slot, i * 16: i * 16 + want.shape[0]], want)


def read_weights(cache, request):
    from trtllm.runtime.adapters import read_peft_weights
    return read_peft_weights(cache.check(request), torch.float32)

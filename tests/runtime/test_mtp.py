"""DeepSeek-V3's multi-token-prediction layer as the draft (models/deepseek_mtp.py,
MTPDecodingConfig): the layer loads from the checkpoint (experts one by one, block FP8
dequantized; bad layouts refused by name); the drafts the engine proposes are the ones a
plain recomputation gives (HF's last-layer states, the layer run over the whole prefix each
step); output stays the target's, greedy and sampled, on (stand-in) decode graphs, under
preemption, with every pool's books balanced."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.test_eagle3 import (
    MIXED_PARAMS,
    _books_balance,
    _EagerDecodeGraph,
    _EagerStepGraph,
    _recording,
    _stand_in_graphs,
)
from tests.runtime.tokenizers import make_tokenizer
from trtllm import MTPDecodingConfig
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.deepseek_mtp import MTPDraft, dequantize_blocks, load_mtp
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

H, V, LAYERS = 64, 128, 2  # tests/models/checkpoints.py's deepseek_v3: layer 0 dense, layer 1 MoE (8 experts)
PROMPTS = [[5, 17, 99, 3, 25, 31, 8], [40, 2], list(range(60, 81)), [9], [7, 8, 9, 7, 8, 9, 7, 8]]


def mtp_tensors(tensors: dict, seed: int = 0) -> dict:
    """A random MTP layer `model.layers.2.*` in the published layout: the decoder layer like
    layer 1 (MLA + MoE, experts one by one), enorm, hnorm, eh_proj, shared_head, embed_tokens."""
    g = torch.Generator().manual_seed(seed)
    mtp = {k.replace(f"model.layers.{LAYERS - 1}.", f"model.layers.{LAYERS}."): v + 0.05 * torch.randn(v.shape, generator=g)
           for k, v in tensors.items() if k.startswith(f"model.layers.{LAYERS - 1}.")}
    p = f"model.layers.{LAYERS}."
    mtp.update({p + "enorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
                p + "hnorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
                p + "eh_proj.weight": 0.15 * torch.randn(H, 2 * H, generator=g),
                p + "shared_head.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
                p + "shared_head.head.weight": 0.5 * torch.randn(V, H, generator=g),
                p + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    return mtp


def write_target(path, mtp: bool = True, **edit):
    write_checkpoint("deepseek_v3", path)
    make_tokenizer(path)
    tensors = load_file(path / "model.safetensors")
    extra = mtp_tensors(tensors) if mtp else {}
    for name, t in edit.items():
        name = f"model.layers.{LAYERS}.{name}"
        if t is None:
            del extra[name]
        else:
            extra[name] = t
    save_file({**tensors, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return write_target(tmp_path_factory.mktemp("mtp_target"))


def small_llm(path, kv_tokens=1024, max_seq_len=64, **kw):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=kv_tokens),
               build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=max_seq_len), **kw)


# -- the reference: HF's last-layer states, the layer recomputed over the whole prefix each step ----
def reference_drafts(target_hf, draft: MTPDraft, tokens: list[int], k: int) -> list[int]:
    states = []
    hook = target_hf.model.layers[-1].register_forward_hook(
        lambda m, i, o: states.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            target_hf(torch.tensor([tokens]))
    finally:
        hook.remove()
    ids, hidden, drafts = list(tokens[1:]), list(states[0][0][:-1]), []  # h_t for t < N - 1, before the norm
    with torch.no_grad():
        for _ in range(k):
            x = torch.tensor([ids])
            pos = torch.arange(len(ids))[None]
            z = draft.eh_proj(torch.cat([draft.enorm(draft.embed_tokens(x)), draft.hnorm(torch.stack(hidden)[None])], -1))
            z = draft.layers[0](z, attention_mask=None, position_ids=pos, position_embeddings=draft.rotary_emb(z, pos))
            d = int(draft.lm_head(draft.norm(z[0, -1])).argmax())
            drafts.append(d)
            ids.append(d)
            hidden.append(z[0, -1])
    return drafts


def _check_drafts(target, calls):
    target_hf = hf_model(target)
    draft = load_mtp(target, target_hf, torch.float32, "cpu")
    for context, drafts in calls:
        assert drafts == reference_drafts(target_hf, draft, context, len(drafts)), context


@pytest.mark.skipif(torch.cuda.is_available(), reason="exact against HF on the CPU")
def test_the_engine_proposes_what_the_plain_recomputation_does(target):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(target, speculative_config=MTPDecodingConfig(num_nextn_predict_layers=3)) as llm:
        calls = []
        proposer = llm.engine.speculative.draft
        assert llm.engine.speculative.max_draft_len == 3
        proposer.propose = _recording(proposer, calls)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        first, hits = len(calls), llm.engine.block_manager.prefix_hit_tokens
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]  # prefix cache
        assert llm.engine.block_manager.prefix_hit_tokens > hits
        assert again == got and len(calls) > first
        summary = proposer.runner.compiled.summary()
        assert "stash_hidden_states: 1" in llm.engine.runner.compiled.summary()
        assert "stash_hidden_states: 1" in summary and "trtllm.mla_attention: " in summary
        assert "trtllm.fused_moe: " in summary
    assert got == expected
    assert len(calls) > 5
    _check_drafts(target, calls)


def test_mixed_batch_is_token_identical_and_books_balance(target):
    params = MIXED_PARAMS
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[4]]
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(target, speculative_config=MTPDecodingConfig(max_draft_len=2)) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        stats = vars(llm.engine_stats())
        assert llm.engine.speculative.max_draft_len == 2
        _books_balance(llm)
    assert got[:-1] == expected[:-1]
    assert len(got[-1]) == params[-1].max_tokens
    assert stats["spec_verify_steps"] > 0 and outs[0].outputs[0].num_verify_steps > 0


def test_preemption_keeps_output_identical(target):
    prompts = [PROMPTS[0] + [1, 2, 3], PROMPTS[4] + [5, 6], list(range(60, 72)), [9] * 3 + [4] * 8]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with small_llm(target, kv_tokens=48, max_seq_len=32) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with small_llm(target, kv_tokens=48, max_seq_len=32, speculative_config=MTPDecodingConfig(max_draft_len=3)) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.scheduler.num_preemptions > 0
        assert vars(llm.engine_stats())["spec_verify_steps"] > 0
        _books_balance(llm)
    assert got == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-ins of CUDA graphs")
def test_graph_steps_keep_drafts_and_output(target):
    """Both runners on (stand-in) CUDA graphs, as on a GPU: the layer's chained decode steps
    and its catch-ups in prefill graphs; the target's decode graphs (the overlap scheduler
    launching steps ahead while a sequence is backed off), short prefill chunks and verify
    steps, all over the latent cache with the capture-time bounds. Drafts still the plain
    recomputation's."""
    k = 3
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    with small_llm(target, speculative_config=MTPDecodingConfig(max_draft_len=k)) as llm:
        proposer = llm.engine.speculative.draft
        assert proposer.runner.prefill_graphs_serve() and llm.engine.runner.prefill_graphs_serve()
        # latent attention captures prefill graphs of at most ABSORBED_MAX_QUERY_LEN (33) tokens
        graphs = _stand_in_graphs(proposer.runner, V, prefill_sizes=(16, 32)) + \
            _stand_in_graphs(llm.engine.runner, V, k, prefill_sizes=(16, 32))
        calls = []
        proposer.propose = _recording(proposer, calls)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        _books_balance(llm)
    assert got == expected
    for runner in (proposer.runner, llm.engine.runner):
        for kind in (_EagerDecodeGraph, _EagerStepGraph):
            assert any(g.replays for g in graphs if g.runner is runner and isinstance(g, kind)), (runner, kind)
    assert any(g.replays for g in graphs if isinstance(g, _EagerStepGraph) and g.rows is None)  # verify
    _check_drafts(target, calls)


# -- loading ---------------------------------------------------------------------------------------
def test_the_layer_loads_with_its_experts_stacked_and_fp8_dequantized(target, tmp_path):
    target_hf = hf_model(target)
    draft = load_mtp(target, target_hf, torch.float32, "cpu")
    tensors = load_file(target / "model.safetensors")
    p = f"model.layers.{LAYERS}."
    gate_up = draft.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[3, :32], tensors[p + "mlp.experts.3.gate_proj.weight"])
    assert torch.equal(gate_up[3, 32:], tensors[p + "mlp.experts.3.up_proj.weight"])
    assert torch.equal(draft.eh_proj.weight, tensors[p + "eh_proj.weight"])
    assert torch.equal(draft.lm_head.weight, tensors[p + "shared_head.head.weight"])
    assert draft.embed_tokens.weight is target_hf.get_input_embeddings().weight
    no_head = write_target(tmp_path / "no_head", **{"shared_head.head.weight": None})  # the target's lm_head, shared
    no_head_hf = hf_model(no_head)
    assert load_mtp(no_head, no_head_hf, torch.float32, "cpu").lm_head.weight is no_head_hf.lm_head.weight
    # in bf16 the layer is bf16 (not copied into fp32 tensors), the router's correction bias fp32 as in transformers
    half = load_mtp(target, hf_model(target, torch.bfloat16), torch.bfloat16, "cpu")
    dtypes = {n: t.dtype for n, t in [*half.named_parameters(), *half.named_buffers()] if t.is_floating_point()}
    assert dtypes.pop("layers.0.mlp.gate.e_score_correction_bias") == torch.float32
    assert {n: d for n, d in dtypes.items() if d != torch.bfloat16 and "rotary" not in n} == {}
    # block FP8, as the published checkpoint stores its linears: weight [N, K] e4m3 and a scale per 128 x 128
    w = tensors[p + "eh_proj.weight"]
    scale = w.abs().amax().reshape(1, 1) / 448
    fp8 = (w / scale).to(torch.float8_e4m3fn)
    assert torch.allclose(dequantize_blocks(fp8, scale, (128, 128)), w, rtol=0.07, atol=1e-3)
    assert dequantize_blocks(fp8, scale, (128, 128)).shape == w.shape
    # a grid of 64x64 blocks read as 128x128 ones: the first scales were spread over the weight, silently
    with pytest.raises(ValueError, match=r"eh: weight_scale_inv has shape \(4, 4\); 128x128 blocks of the 256x256 "
                                         r"weight need \(2, 2\)"):
        dequantize_blocks(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(4, 4), (128, 128), "eh")


@pytest.mark.parametrize("edit, match", [
    (dict(mtp=False), r"no tensor model\.layers\.2\.\*"),
    ({"hnorm.weight": None}, r"tensor model\.layers\.2\.hnorm\.weight is missing"),
    ({"mlp.experts.5.up_proj.weight": None}, r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight is missing"),
    ({"eh_proj.weight": torch.zeros(H, H)}, r"eh_proj\.weight is \(64, 64\), the config says \(64, 128\)"),
    ({"mystery.weight": torch.zeros(3)}, r"unexpected tensor model\.layers\.2\.mystery\.weight"),
    ({"hnorm.weight": torch.full((H,), float("nan"))}, r"model\.layers\.2\.hnorm\.weight' holds \d+ NaN"),
])
def test_bad_layers_are_refused_by_name(tmp_path, edit, match):
    path = write_target(tmp_path / "t", **edit)
    with pytest.raises(ValueError, match=match):
        small_llm(path, speculative_config=MTPDecodingConfig())


def test_bad_configs_are_refused_by_name(target, tmp_path):
    for options, match in [(dict(use_mtp_vanilla=True), "use_mtp_vanilla=True"),
                           (dict(mtp_eagle_one_model=False), "mtp_eagle_one_model=False"),
                           (dict(use_relaxed_acceptance_for_thinking=True), "relaxed acceptance")]:
        with pytest.raises(ValueError, match=match):
            small_llm(target, speculative_config=MTPDecodingConfig(**options))
    none = write_target(tmp_path / "none", mtp=False)
    config = json.loads((none / "config.json").read_text())
    (none / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match="num_nextn_predict_layers is 0: the checkpoint has no MTP layer"):
        small_llm(none, speculative_config=MTPDecodingConfig())
    llama = write_checkpoint("llama31", tmp_path / "llama", vocab_size=V)
    make_tokenizer(llama)
    with pytest.raises(ValueError, match="needs a DeepSeek-V3 checkpoint"):
        small_llm(llama, speculative_config=MTPDecodingConfig())
    with pytest.raises(ValueError, match="over multi-head latent attention"):
        from trtllm import EagleDecodingConfig
        small_llm(target, speculative_config=EagleDecodingConfig(speculative_model_dir=str(tmp_path)))


def test_the_commands_spell_it_mtp():
    from trtllm.runtime.speculative.config import speculative_config_from_options
    cfg = speculative_config_from_options("mtp", 3, None, None)  # None: not given (an n-gram size is refused)
    assert isinstance(cfg, MTPDecodingConfig) and cfg.draft_len == 3
    assert speculative_config_from_options("mtp", None, None, None).draft_len == 4  # the commands' default

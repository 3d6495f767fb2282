"""EAGLE-3 heads (models/eagle3.py, runtime/speculative/eagle3.py): the published layout
loads (bad ones refused by name); the drafts the engine proposes are the ones a plain
recomputation gives (HF target hidden states, the head run over the whole prefix each step);
output stays the target's, greedy and sampled, chained on (stand-in) decode graphs, under
preemption, with every pool's books balanced."""
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import EagleDecodingConfig
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.eagle3 import Eagle3Config, Eagle3Draft, load_eagle3
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

V, H, LAYERS, VD = 512, 64, 4, 300
AUX = [0, 1, 2]  # not the last layer: HF hands that one out after the final norm
PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9], [7, 8, 9, 7, 8, 9, 7, 8]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("eagle_target")
    write_checkpoint("llama31", path, vocab_size=V, num_hidden_layers=LAYERS)
    make_tokenizer(path)
    return path


def write_head(directory, seed=0, draft_vocab=VD, aux=AUX, prefix="midlayer.", drop=(), reshape=None, **config):
    """A random EAGLE-3 head in the published layout (no embed_tokens: the target's)."""
    g = torch.Generator().manual_seed(seed)
    hd, heads, kv, inter = 16, 4, 2, 96

    def w(*shape, scale=0.15):
        return torch.randn(shape, generator=g) * scale

    def norm():
        return 1 + 0.1 * torch.randn(H, generator=g)

    ids = torch.randperm(V, generator=g)[:draft_vocab].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    tensors = {"fc.weight": w(H, 3 * H), "norm.weight": norm(), "lm_head.weight": w(draft_vocab, H, scale=0.5),
               "d2t": ids - torch.arange(draft_vocab), "t2d": t2d,
               f"{prefix}input_layernorm.weight": norm(), f"{prefix}hidden_norm.weight": norm(),
               f"{prefix}post_attention_layernorm.weight": norm(),
               f"{prefix}self_attn.q_proj.weight": w(heads * hd, 2 * H), f"{prefix}self_attn.k_proj.weight": w(kv * hd, 2 * H),
               f"{prefix}self_attn.v_proj.weight": w(kv * hd, 2 * H), f"{prefix}self_attn.o_proj.weight": w(H, heads * hd),
               f"{prefix}mlp.gate_proj.weight": w(inter, H), f"{prefix}mlp.up_proj.weight": w(inter, H),
               f"{prefix}mlp.down_proj.weight": w(H, inter)}
    for name in drop:
        del tensors[name]
    if reshape is not None:
        tensors[reshape] = tensors[reshape][:-1]
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 256, "vocab_size": V, "draft_vocab_size": draft_vocab,
           "eagle_aux_hidden_state_layer_ids": aux, **config}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def head(target):
    return write_head(target.parent / "eagle_head")


def small_llm(path, kv_tokens=4096, max_seq_len=64, **kw):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=kv_tokens),
               build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=max_seq_len), **kw)


# -- the reference: HF target states, the head recomputed over the whole prefix each step -----------
def reference_drafts(target_hf, head: Eagle3Draft, tokens: list[int], k: int) -> list[int]:
    with torch.no_grad():
        out = target_hf(torch.tensor([tokens]), output_hidden_states=True)
        states = out.hidden_states  # [0] embeddings, [i + 1] the output of layer i
        g = head.fc(torch.cat([states[i + 1][0] for i in head.config.aux_layers], -1))  # [N, H]
        ids, hidden, drafts = list(tokens[1:]), list(g[:-1]), []
        for _ in range(k):
            n = len(ids)
            x = torch.tensor([ids])
            cos, sin = head.rotary_emb(torch.arange(n)[None], torch.float32)
            prenorm = head.layers[0](head.embed_tokens(x), torch.stack(hidden)[None], cos, sin)  # [1, n, H]
            d = int(head.draft_to_target[head.lm_head(head.norm(prenorm[0, -1])).argmax()])
            drafts.append(d)
            ids.append(d)
            hidden.append(prenorm[0, -1])
    return drafts


def _recording(proposer, calls: list):
    propose = proposer.propose

    def recorded(seqs, ks, live):
        contexts = [list(s.token_ids) for s in seqs]
        out = propose(seqs, ks, live)
        calls.extend((ctx, tokens) for ctx, (tokens, _) in zip(contexts, out) if tokens)
        return out
    return recorded


@pytest.mark.skipif(torch.cuda.is_available(), reason="exact against HF on the CPU; on a GPU, test_eagle3_gpu.py "
                                                    "compares graph and eager engines on one device")
def test_the_engine_proposes_what_the_plain_recomputation_does(target, head):
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cfg = EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(head))
    with small_llm(target, speculative_config=cfg) as llm:
        calls = []
        proposer = llm.engine.speculative.draft
        proposer.propose = _recording(proposer, calls)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        first, hits = len(calls), llm.engine.block_manager.prefix_hit_tokens
        # again: the prompts' full blocks now come from the prefix cache, their states from the
        # rows the first run stashed beside their K/V
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.block_manager.prefix_hit_tokens > hits
        assert again == got and len(calls) > first
        assert "stash_hidden_states: 1" in llm.engine.runner.compiled.summary()
        assert "stash_hidden_states: 1" in proposer.runner.compiled.summary()
    assert got == expected
    assert len(calls) > 5
    target_hf = hf_model(target)
    ref_head = load_eagle3(head, target_hf, torch.float32, "cpu")
    for context, drafts in calls:
        assert drafts == reference_drafts(target_hf, ref_head, context, len(drafts)), context


def _books_balance(llm):
    llm.block_manager.check_invariants()
    assert llm.block_manager.num_used_blocks == 0
    draft = llm.engine.speculative.draft
    draft.block_manager.check_invariants()
    assert draft.block_manager.num_used_blocks == 0 and not draft.mirrors and not draft.eagle.exact


# greedy, penalties, logprobs (not speculated), sampled: a mixed batch for a hidden-state draft (also test_mtp.py)
MIXED_PARAMS = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.2, min_tokens=4),
                SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2),
                SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True),
                SamplingParams(max_tokens=13, temperature=0.9, top_k=20, seed=7, ignore_eos=True)]


def test_mixed_batch_is_token_identical_and_books_balance(target, head):
    """Greedy, penalties, logprobs (not speculated), sampled (rejection sampling against the
    head's distribution over its vocabulary)."""
    params = MIXED_PARAMS
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[4]]
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cfg = EagleDecodingConfig(max_draft_len=4, speculative_model_dir=str(head))
    with small_llm(target, speculative_config=cfg) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        stats = vars(llm.engine_stats())
        _books_balance(llm)
    assert got[:-1] == expected[:-1]
    assert len(got[-1]) == params[-1].max_tokens
    assert stats["spec_verify_steps"] > 0 and outs[0].outputs[0].num_verify_steps > 0
    assert outs[2].outputs[0].num_verify_steps == 0  # logprobs asked: no speculation


def test_preemption_keeps_output_identical(target, head):
    """3 blocks of 16 tokens for 4 sequences growing to 2 blocks each: preempted, recomputed
    (the target's states with their K/V), the heads' mirrors freed and made again."""
    prompts = [PROMPTS[0] + [1, 2, 3], PROMPTS[4] + [5, 6], list(range(60, 72)), [9] * 3 + [4] * 8]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with small_llm(target, kv_tokens=48, max_seq_len=32) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cfg = EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(head))
    with small_llm(target, kv_tokens=48, max_seq_len=32, speculative_config=cfg) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.scheduler.num_preemptions > 0
        assert vars(llm.engine_stats())["spec_verify_steps"] > 0
        _books_balance(llm)
    assert got == expected


class _EagerDecodeGraph:
    """A captured decode graph's stand-in on the CPU (tests/runtime/test_speculative.py's, with
    the graph's other inputs, the hidden-state stores, and the runner's pick map): replay runs
    the compiled model on the runner's b padded tokens."""

    def __init__(self, runner, b: int, vocab: int):
        self.runner, self.b, self.replays = runner, b, 0
        self.logits, self.greedy = torch.zeros(b, vocab), torch.zeros(2, b, dtype=torch.long)

    def replay(self):
        from trtllm.attention_context import attention_context
        from trtllm.runtime.sampler import greedy_picks
        r = self.runner
        with attention_context(r.cache, r.meta), r.graph_inputs():
            self.logits.copy_(r.compiled(*r._flat_batch(self.b))[0])
        picks = greedy_picks(self.logits)
        self.greedy.copy_(torch.stack([r.pick_map[picks[0]], picks[1]]) if r.pick_map is not None else picks)
        self.replays += 1


class _EagerStepGraph:
    """A prefill (rows = min(T, max_num_seqs) logits of the staged indices, capture-time bounds)
    or verify (rows None: every token's logits) graph's stand-in, the stores in its context."""

    def __init__(self, runner, tokens: int, vocab: int, rows: int | None):
        self.runner, self.tokens, self.rows, self.replays = runner, tokens, rows, 0
        self.logits = torch.zeros(rows or tokens, vocab)

    def replay(self):
        from trtllm.attention_context import attention_context
        r, t = self.runner, self.tokens
        meta = r.meta
        host_ints = meta.num_seqs, meta.max_query_len, meta.max_seq_len
        if self.rows is not None:
            meta.num_seqs, meta.max_query_len, meta.max_seq_len = min(meta.max_num_seqs, t), t, r.max_model_len
        try:
            with attention_context(r.cache, meta), r.graph_inputs():
                if self.rows is None:
                    self.logits.copy_(r.compiled(*r._flat_batch(t))[0])
                else:
                    self.logits.copy_(r.compiled(*r._flat_batch(t), r.logits_indices[:self.rows]))
        finally:
            meta.num_seqs, meta.max_query_len, meta.max_seq_len = host_ints
        self.replays += 1


def _stand_in_graphs(runner, vocab: int, k: int | None = None, prefill_sizes=(16, 32, 64)) -> list:
    """Decode and prefill graphs (and verify graphs of k drafts) on `runner`, as a GPU captures them."""
    decode = {b: _EagerDecodeGraph(runner, b, vocab) for b in (1, 2, 4, 8)}
    runner.cuda_graphs.decode = {b: (g, g.logits, g.greedy) for b, g in decode.items()}
    prefill = {t: _EagerStepGraph(runner, t, vocab, min(t, runner.meta.max_num_seqs)) for t in prefill_sizes}
    runner.cuda_graphs.prefill = {t: (g, g.logits) for t, g in prefill.items()}
    graphs = [*decode.values(), *prefill.values()]
    if k is not None:
        verify = {b: _EagerStepGraph(runner, b * (k + 1), vocab, None) for b in (1, 2, 4, 8)}
        runner.cuda_graphs.verify = {b: (g, g.logits) for b, g in verify.items()}
        runner.cuda_graphs.verify_len = k + 1
        graphs += verify.values()
    return graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-ins of CUDA graphs (a GPU captures real ones: "
                                                    "test_eagle3_gpu.py)")
def test_graph_steps_keep_drafts_and_output(target, head):
    """Both runners on (stand-in) CUDA graphs, as on a GPU: the head's chained decode steps and
    prefill catch-ups, the target's decode (so the overlap scheduler launches steps ahead while
    a sequence is backed off), prefill and verify graphs. Drafts still the plain recomputation's."""
    k = 3
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    with small_llm(target) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    cfg = EagleDecodingConfig(max_draft_len=k, speculative_model_dir=str(head))
    with small_llm(target, speculative_config=cfg) as llm:
        proposer = llm.engine.speculative.draft
        graphs = _stand_in_graphs(proposer.runner, VD) + _stand_in_graphs(llm.engine.runner, V, k)
        calls, ahead = [], []
        proposer.propose = _recording(proposer, calls)
        launch_ahead = llm.engine._launch_ahead
        llm.engine._launch_ahead = lambda *args: ahead.append(launch_ahead(*args)) or ahead[-1]
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        _books_balance(llm)
    assert got == expected
    assert any(g.replays for g in graphs if g.runner is proposer.runner and isinstance(g, _EagerDecodeGraph))
    assert any(g.replays for g in graphs if isinstance(g, _EagerStepGraph) and g.rows is None)  # verify
    assert any(g.replays for g in graphs if isinstance(g, _EagerStepGraph) and g.rows is not None)  # prefill
    assert any(a is not None for a in ahead)  # backed off (a random head): steps launched ahead
    target_hf = hf_model(target)
    ref_head = load_eagle3(head, target_hf, torch.float32, "cpu")
    for context, drafts in calls:
        assert drafts == reference_drafts(target_hf, ref_head, context, len(drafts)), context


# -- loading ---------------------------------------------------------------------------------------
def test_the_layout_loads_either_prefix_and_shares_the_target_embedding(target, tmp_path):
    target_hf = hf_model(target)
    a = load_eagle3(write_head(tmp_path / "a", prefix="midlayer."), target_hf, torch.float32, "cpu")
    b = load_eagle3(write_head(tmp_path / "b", prefix="layers.0."), target_hf, torch.float32, "cpu")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    assert a.embed_tokens.weight is target_hf.get_input_embeddings().weight
    assert a.config.aux_layers == tuple(AUX) and a.lm_head.out_features == VD
    assert set(a.draft_to_target.tolist()) <= set(range(V)) and len(set(a.draft_to_target.tolist())) == VD
    half = load_eagle3(write_head(tmp_path / "c"), hf_model(target, torch.bfloat16), torch.bfloat16, "cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # not copied into fp32 tensors


@pytest.mark.parametrize("kw, match", [
    (dict(drop=["midlayer.hidden_norm.weight"]), "layers.0.hidden_norm.weight .* is missing"),
    (dict(reshape="fc.weight"), r"fc.weight is \(63, 192\), the config says \(64, 192\)"),
    (dict(drop=["d2t"]), r"a draft vocabulary of 300 tokens \(the target.s: 512\) needs d2t"),
    (dict(architectures=["LlamaForCausalLMEagle"]), "not an EAGLE-3 head"),
])
def test_bad_heads_are_refused_by_name(target, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        load_eagle3(write_head(tmp_path / "h", **kw), hf_model(target), torch.float32, "cpu")


def test_bad_configs_are_refused_by_name(target, head, tmp_path):
    with pytest.raises(ValueError, match="needs speculative_model_dir"):
        small_llm(target, speculative_config=EagleDecodingConfig(max_draft_len=3))
    with pytest.raises(ValueError, match="eagle3_one_model=False"):
        small_llm(target, speculative_config=EagleDecodingConfig(speculative_model_dir=str(head),
                                                                 eagle3_one_model=False))
    with pytest.raises(ValueError, match=r"three distinct target layers of 4; got \[0, 1, 7\]"):
        small_llm(target, speculative_config=EagleDecodingConfig(speculative_model_dir=str(head),
                                                                 eagle3_layers_to_capture={0, 1, 7}))
    module = load_eagle3(head, hf_model(target), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"got \[0, 1, 7\]"):
        small_llm(target, speculative_config=EagleDecodingConfig(speculative_model_dir=module,
                                                                 eagle3_layers_to_capture={0, 1, 7}))
    assert module.config.aux_layers == tuple(AUX)  # the module's own config untouched
    defaults = write_head(tmp_path / "d", aux=None)  # (1, L/2 - 1, L - 4) = (1, 1, 0) for 4 layers
    with pytest.raises(ValueError, match="by default: set eagle_aux_hidden_state_layer_ids"):
        small_llm(target, speculative_config=EagleDecodingConfig(speculative_model_dir=str(defaults)))
    other = write_checkpoint("llama31", tmp_path / "wide", vocab_size=V, num_hidden_layers=LAYERS, hidden_size=96)
    make_tokenizer(other)
    with pytest.raises(ValueError, match="reads target states of 64, the target's are 96|embedding is"):
        small_llm(other, speculative_config=EagleDecodingConfig(speculative_model_dir=str(head)))


def test_config_reads_the_published_fields():
    cfg = Eagle3Config.from_hf({"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 4096,
                                "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "draft_vocab_size": 32000, "rope_theta": 500000.0,
                                "num_hidden_layers": 1})
    assert (cfg.head_dim, cfg.draft_vocab_size, cfg.target_hidden_size) == (128, 32000, 4096)
    assert cfg.target_layers(32) == (1, 15, 28)  # TensorRT-LLM's default: (1, L/2 - 1, L - 4)


def test_the_demo_models_trained_head_is_accepted_often_and_changes_nothing():
    """The head shipped beside the demo model (tools/train_eagle3_head.py): on held-out
    entries its drafts are accepted for ~2.5-2.9 tokens a verify step (bench/bench_eagle3_demo.py);
    a broken stash, shift or vocabulary map would make that ~1."""
    from trtllm.demo import HELDOUT_SAMPLE, demo_model_path, read_entries
    from trtllm.runtime.tokenizer import load_tokenizer
    model = demo_model_path()
    entries = read_entries(model / HELDOUT_SAMPLE)[:6]
    prompts = [ids[:16] for ids in load_tokenizer(str(model))(entries)["input_ids"]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    build = BuildConfig(max_batch_size=8, max_num_tokens=256, max_seq_len=128)
    with LLM(str(model), dtype="float32", build_config=build) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cfg = EagleDecodingConfig(max_draft_len=4, speculative_model_dir=str(model / "eagle3"))
    with LLM(str(model), dtype="float32", build_config=build, speculative_config=cfg) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = vars(llm.engine_stats())
    assert got == expected
    assert 1 + stats["spec_accepted_tokens"] / stats["spec_verify_steps"] > 2.0


def test_the_commands_spell_it_eagle3():
    from trtllm.config import ConfigError
    from trtllm.runtime.speculative.config import speculative_config_from_options
    cfg = speculative_config_from_options("eagle3", 3, None, "head/")
    assert isinstance(cfg, EagleDecodingConfig) and cfg.max_draft_len == 3 and cfg.speculative_model_dir == "head/"
    with pytest.raises(ConfigError, match="eagle3 needs --speculative_model_dir"):
        speculative_config_from_options("eagle3", 3, None, None)
    with pytest.raises(ConfigError, match="--max_matching_ngram_size: is for --speculative ngram, not eagle3"):
        speculative_config_from_options("eagle3", 3, 2, "head/")  # an n-gram size eagle3 would not read

"""DeepSeek-V3's MTP layer as the draft (MTPDecodingConfig): acceptance, tokens per step and
speed-up against the same target without speculation, in one run. No DeepSeek-V3 fits one
GPU, and no trained MTP layer can be downloaded here, so:

    PYTHONPATH=$PWD python bench/bench_mtp.py [--smoke] [--draft-len 3]

The target: DeepSeek-V3's architecture (transformers' DeepseekV3ForCausalLM: MLA with a
query LoRA, sigmoid-routed MoE with a shared expert, first layer dense) at DeepSeek-V2-Lite's
size (27 layers, hidden 2048, 64 experts top 6: ~16B parameters), random bf16 weights, every
layer's output projections (o_proj, the MLPs' and experts' down_proj) zeroed: the layers add
nothing to the residual, so the target's logits at t are lm_head(norm(embed(token t))), a
bigram table, while every step still costs the full model's kernels. Two MTP layers of the
published layout (models/deepseek_mtp.py):
- **~100% acceptance**: eh_proj = [I | 0] (it passes enorm(embed(token t + 1)) on, with
  enorm's weight 1), its decoder layer's output projections zeroed, shared_head.norm and
  .head the target's norm and lm_head: it predicts token t + 2 as the target will (the
  bigram of token t + 1), at the cost of one decoder layer and the head a draft token;
- **~0% acceptance**: random weights, what the machinery costs (the target's graph stashing
  its last state, the layer's steps, the back-off after rejected steps).
Rows at batch 1 and batch 32: output tok/s with and without MTP, the speed-up, the draft
tokens' acceptance rate and acceptance length, the sequences token-identical to the plain run
and, where one parts from it, how far below the plain target's pick its token lies (at most
bench_speculative.MAX_DIVERGENCE_GAP nats, else exit 1). Decode and verify steps and the
layer's chained draft steps run in CUDA graphs (verify steps over the latent cache: each
token a decode query, trtllm/mla_attention.py). --only exact|random: one layer. --smoke: tiny
fp32 shapes on the CPU. Table last; JSON under $OUT when set.
"""
import argparse

import torch

from bench.bench_speculative import make_llm, measured_row, prompts
from bench.report import markdown, report
from trtllm.models.deepseek_mtp import MTPDraft
from trtllm.runtime.speculative.config import MTPDecodingConfig

# DeepSeek-V3's architecture at DeepSeek-V2-Lite's size (trtllm/cli/model_arg.py's deepseek-v2-lite preset),
# V3's query LoRA (1536 in V3; 512 here, scaled with the hidden size) and routing (sigmoid, one group)
V3_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
               n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
               routed_scaling_factor=1.0, norm_topk_prob=True, kv_lora_rank=512, q_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=4096,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, num_nextn_predict_layers=1)
SMOKE = dict(V3_LITE, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16)


def _randomize(module: torch.nn.Module) -> None:
    """Norms around 1, matrices ~ N(0, 1/fan_in) (the last dim of every weight, experts' too)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)


def _zero_outputs(layer) -> None:
    """The decoder layer adds nothing to the residual: o_proj and every down_proj zeroed."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        mlp = layer.mlp
        for down in (getattr(mlp, "down_proj", None), getattr(getattr(mlp, "shared_experts", None), "down_proj", None)):
            if down is not None:
                down.weight.zero_()
        experts = getattr(mlp, "experts", None)
        if experts is not None:
            experts.down_proj.zero_()


def _in(device, dtype, make):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in dtype: 16B parameters never exist in fp32 first
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(default)


def zeroed_target(shape: dict, device, dtype):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(0)
    config = DeepseekV3Config(**shape)
    target = _in(device, dtype, lambda: DeepseekV3ForCausalLM(config))
    _randomize(target)
    for layer in target.model.layers:
        _zero_outputs(layer)
    return target.eval().requires_grad_(False)


def mtp_layer(target, device, dtype, exact: bool, seed: int) -> MTPDraft:
    """The ~100% (`exact`) or the ~0% acceptance layer of the module docstring."""
    torch.manual_seed(seed)
    draft = _in(device, dtype, lambda: MTPDraft(target.config))
    _randomize(draft)
    draft.embed_tokens = target.model.embed_tokens
    if exact:
        h = target.config.hidden_size
        with torch.no_grad():
            draft.eh_proj.weight.zero_()
            draft.eh_proj.weight[:, :h].copy_(torch.eye(h))
            draft.enorm.weight.fill_(1.0)
            _zero_outputs(draft.layers[0])
        draft.norm, draft.lm_head = target.model.norm, target.lm_head
    draft.rotary_emb = type(draft.rotary_emb)(draft.config).to(device)
    draft.draft_to_target = torch.arange(target.config.vocab_size, device=device)
    return draft.eval().requires_grad_(False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (the default without a GPU)")
    ap.add_argument("--new", type=int, default=None, help="new tokens a request (128; smoke 16)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (128; smoke 16)")
    ap.add_argument("--draft-len", type=int, default=3)
    ap.add_argument("--large-batch", type=int, default=None, help="the batch row (32; smoke 4)")
    ap.add_argument("--only", choices=["exact", "random"], help="one MTP layer only (default both)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype, shape = ("cuda", torch.bfloat16, V3_LITE) if cuda else ("cpu", torch.float32, SMOKE)
    args.new = args.new or (128 if cuda else 16)
    args.prompt = args.prompt or (128 if cuda else 16)
    large, k, vocab = args.large_batch or (32 if cuda else 4), args.draft_len, shape["vocab_size"]

    target = zeroed_target(shape, device, dtype)
    workloads = [("MTP layer, ~100% acceptance", mtp_layer(target, device, dtype, exact=True, seed=1))
                 if args.only in (None, "exact") else None,
                 ("MTP layer, random (~0% acceptance)", mtp_layer(target, device, dtype, exact=False, seed=2))
                 if args.only in (None, "random") else None]
    batches = [(1, prompts(1, args.prompt, vocab, 0)), (large, prompts(large, args.prompt, vocab, 1))]
    rows, record = [], {"device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape, "new": args.new,
                        "prompt": args.prompt, "draft_len": k, "rows": []}
    plain = make_llm(target, args, device, large)
    for name, layer in filter(None, workloads):
        config = MTPDecodingConfig(max_draft_len=k, speculative_model_dir=layer)
        with make_llm(target, args, device, large, speculative_config=config) as llm:
            for _, batch in batches:
                row, full = measured_row(plain, llm, name, batch, args.new, k, "MTP tok/s")
                rows.append(row)
                record["rows"].append(full)
    plain.shutdown()
    report("bench_mtp", markdown(rows), record)


if __name__ == "__main__":
    main()

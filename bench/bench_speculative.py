"""Speculative decoding: acceptance, tokens per step and speed-up against the same target
without speculation, in one run (issue 24's construction; real acceptance needs trained
draft/target pairs we cannot download).

    PYTHONPATH=$PWD python bench/bench_speculative.py [--smoke] [--new 128] [--draft-len 4]

The target: Llama-3.1-8B shapes, random bf16 weights, every layer's output projections
(o_proj, down_proj) zeroed: the layers add nothing to the residual, so the target is a bigram
model (its next token a function of its last) while it costs a full 8B forward pass, as
bench_mtp's. (Until 2026-12-05 the first two layers stayed live; zeroing them too keeps the
draft's ~100% acceptance and its cost, and lets the n-gram row's periodic text be built
exactly.) Workloads, each against the plain target (overlap scheduler and decode CUDA
graphs on, as users run it) on the same prompts:
- draft model at ~100% acceptance: a 2-layer draft sharing the target's embedding, first
  two layers, norm and head (`DraftTargetDecodingConfig`), batch 1 and batch 32;
- n-gram lookup (`NGramDecodingConfig`, max_matching_ngram_size 3) at batch 1 on periodic
  text, issue 24's floor: the head also maps each token of a 16-token phrase to the next
  (`periodic_phrase`), so the target's greedy text after the repeated phrase repeats it,
  ~100% acceptance (the machinery's speed); then on a repeated random phrase, which the
  bigram target does not follow: what lookup costs when it finds nothing to propose;
- an EAGLE-3 head (`EagleDecodingConfig`) of the published 8B heads' shapes, random weights:
  what its machinery costs at ~0% acceptance (the target stashing its states, the head's
  steps), batch 1 and batch 32 (real acceptance: bench/bench_eagle3_demo.py);
- the overhead at ~0% acceptance: a 2-layer draft of other random weights, batch 1.
Per row: output tok/s with and without speculation, the speed-up, the draft tokens'
acceptance rate, the acceptance length (tokens a verify step gains: accepted + 1), and
the fraction of sequences token-identical to the plain run (with random bf16 weights near-ties
are common: over 128 tokens most sequences meet one), and, where a sequence parts from the
plain run, how far below the plain target's pick its token lies (the check: at most
MAX_DIVERGENCE_GAP nats, else exit 1).
Verify steps run under CUDA graphs (the configs' default on a GPU: graphs for b sequences of
k + 1 tokens) unless --no-verify-graphs (0.44x vs 1.95x at batch 1 on the H200, 2026-12-03). --only draft|ngram|eagle|random runs a subset (one engine build per workload).
--smoke: tiny fp32 shapes, runs on the CPU. Table last; JSON under $OUT when set.
"""
import argparse
import time

import torch

from bench.report import markdown, report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.models.eagle3 import Eagle3Config, Eagle3Draft
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.runtime.llm import LLM
from trtllm.runtime.speculative.config import DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig
from trtllm.sampling_params import MAX_LOGPROBS, SamplingParams

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0)
SMOKE = dict(LLAMA31_8B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32)
DRAFT_LAYERS = 2
PHRASE = 16  # the n-gram rows' repeated phrase, tokens
# Where a speculative sequence parts from the plain one, its token must be a near-tie of the
# plain target's pick (bf16 rounding between a verify chunk and a decode step), not a token
# far below it: random weights' logits are ~N(0, 1) over 128k tokens, so a wrong token lies
# nats below.
MAX_DIVERGENCE_GAP = 0.25


def random_llama(shape: dict, num_layers: int, seed: int, device, dtype) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in dtype: an 8B model never exists in fp32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**dict(shape, num_hidden_layers=num_layers)))
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():  # norms around 1, matrices ~ N(0, 1/fan_in)
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    model.init_buffers(torch.device(device))
    return model.eval().requires_grad_(False)


def zeroed_target_and_draft(shape: dict, device, dtype, seed: int = 0):
    """(target, draft): the target's layers add nothing (o_proj and down_proj zeroed); the
    draft is its first DRAFT_LAYERS layers, embedding, norm and head (the same Parameters,
    no copy), so it predicts what the target does."""
    target = random_llama(shape, shape["num_hidden_layers"], seed, device, dtype)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    with torch.device("meta"):
        draft = LlamaForCausalLM(LlamaConfig(**dict(shape, num_hidden_layers=DRAFT_LAYERS)))
    draft.model.embed_tokens, draft.model.norm, draft.lm_head = (target.model.embed_tokens, target.model.norm,
                                                                 target.lm_head)
    draft.model.layers = torch.nn.ModuleList(target.model.layers[:DRAFT_LAYERS])
    draft.init_buffers(torch.device(device))
    return target, draft.eval()


def periodic_phrase(target: LlamaForCausalLM, length: int, seed: int, gain: float = 30.0) -> list[int]:
    """A phrase of `length` distinct tokens that the bigram `target`'s greedy text cycles
    through: after token x its final state is norm(embedding(x)) =: n_x, and the head's row
    of x's successor in the phrase gains gain * n_x / |n_x|^2, so that successor's logit
    rises by `gain` against logits ~N(0, 1); the phrase's last token leads to its first.
    Issue 24's periodic text, with a known ~100% acceptance. Other tokens' logits move by
    ~gain / sqrt(hidden) (0.5 at 8B shapes); the draft shares the head and keeps its
    acceptance."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randperm(target.config.vocab_size, generator=g)[:length].tolist()
    norm = target.model.norm
    with torch.no_grad():
        emb = target.model.embed_tokens.weight[phrase].float()                      # [L, D]
        normed = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
        rows = gain * normed / normed.pow(2).sum(-1, keepdim=True)                  # rows . normed = gain
        target.lm_head.weight[phrase[1:] + phrase[:1]] += rows.to(target.lm_head.weight.dtype)
    return phrase


def random_eagle3(shape: dict, device, dtype, seed: int = 2) -> Eagle3Draft:
    """An EAGLE-3 head of the published Llama-3.1-8B heads' shapes (32,000-token draft
    vocabulary), random weights: ~0% acceptance, the machinery's cost."""
    vd = min(32000, shape["vocab_size"] // 2)
    config = Eagle3Config(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                          num_attention_heads=shape["num_attention_heads"],
                          num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
                          vocab_size=shape["vocab_size"], draft_vocab_size=vd, target_hidden_size=shape["hidden_size"],
                          rms_norm_eps=shape["rms_norm_eps"], rope_theta=shape["rope_theta"],
                          max_position_embeddings=shape["max_position_embeddings"],
                          aux_layers=None if shape["num_hidden_layers"] >= 8 else (0, 1, 2))  # smoke: 4 layers
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            head = Eagle3Draft(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
    head.rotary_emb.init_buffers(torch.device(device))
    head.draft_to_target = torch.randperm(shape["vocab_size"])[:vd].sort().values.to(device)
    return head.eval().requires_grad_(False)


def prompts(n: int, length: int, vocab: int, seed: int, periodic: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    if not periodic:
        return torch.randint(0, vocab, (n, length), generator=g).tolist()
    phrase = torch.randint(0, vocab, (n, PHRASE), generator=g)
    return phrase.repeat(1, -(-length // PHRASE))[:, :length].tolist()


def repeated(phrase: list[int], length: int) -> list[int]:
    """`phrase` repeated to `length` tokens, cut to end on its last token (its continuation
    starts the phrase again)."""
    return phrase * max(1, length // len(phrase))


def run(llm: LLM, batch: list[list[int]], new: int) -> tuple[list[list[int]], float, dict]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    # warm-up (compilation, graphs), twice: the second sees the prefix cache as the timed run
    # does, so it has the timed run's schedule; the first one's chunked prefill staggers the
    # batch, and the timed run's last verify step (2 tokens each for all 32) first ran in the
    # timed run: 1.24 s of it on the H200, 2026-12-05 (a first launch of that shape)
    for _ in range(2):
        llm.generate(batch, params, use_tqdm=False)
    before = vars(llm.engine_stats())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - t
    after = vars(llm.engine_stats())
    spec = {k: after[k] - before[k] for k in ("spec_draft_tokens", "spec_accepted_tokens", "spec_verify_steps")}
    return [o.outputs[0].token_ids for o in outs], wall, spec


def divergence_gaps(plain: LLM, batch: list[list[int]], expected: list[list[int]], got: list[list[int]]
                    ) -> list[float]:
    """For each sequence that parts from the plain run: at the first token where it does,
    how far below the plain target's own pick its token lies, in log-probability (the plain
    engine, one step from the common prefix). A near-tie flipped by rounding gives ~0; a wrong
    verify (a token the target did not rank first) gives the gap of a random token, nats."""
    gaps = []
    for prompt, want, have in zip(batch, expected, got):
        d = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
        if d is None:
            continue
        out = plain.generate([prompt + want[:d]], SamplingParams(max_tokens=1, temperature=0.0, logprobs=MAX_LOGPROBS),
                             use_tqdm=False)[0].outputs[0]
        top = out.logprobs[0]
        first = top[out.token_ids[0]]
        gaps.append(first - top.get(have[d], min(top.values())))  # not in the top 20: at least this far
    return gaps


def measured_row(plain: LLM, llm: LLM, name: str, batch: list[list[int]], new: int, k: int, label: str,
                 extra: dict | None = None) -> tuple[dict, dict]:
    """One workload at one batch: the plain and the speculative engine on the same prompts;
    (the table's row, the row with raw figures for the JSON). Exit 1 where a sequence parts
    from the plain run on a token far below the plain target's pick (module docstring)."""
    b = len(batch)
    expected, plain_s, _ = run(plain, batch, new)
    got, spec_s, st = run(llm, batch, new)
    drafts, accepted, steps = st["spec_draft_tokens"], st["spec_accepted_tokens"], st["spec_verify_steps"]
    row = {"workload": name, "batch": b, "draft len": k, **(extra or {}),
           "plain tok/s": f"{b * new / plain_s:,.1f}", label: f"{b * new / spec_s:,.1f}",
           "speed-up": f"{plain_s / spec_s:.2f}x", "acceptance": f"{accepted / drafts:.1%}" if drafts else "-",
           "acceptance length": f"{1 + accepted / steps:.2f}" if steps else "-",
           # a sequence's steps: one a token, less one for each accepted draft token
           "tokens/step": f"{b * new / (b * new - accepted):.2f}",
           "identical": f"{sum(a == e for a, e in zip(got, expected)) / len(expected):.2f}"}
    gaps = divergence_gaps(plain, batch, expected, got)
    row["max gap at a divergence"] = f"{max(gaps):.3f}" if gaps else "-"
    if gaps and max(gaps) > MAX_DIVERGENCE_GAP:
        raise SystemExit(f"{name}, batch {b}: a speculative sequence took a token {max(gaps):.3f} nats "
                         f"below the plain target's pick (> {MAX_DIVERGENCE_GAP}): verification is wrong")
    print(row, flush=True)
    return row, dict(row, plain_s=plain_s, spec_s=spec_s, draft_tokens=drafts, accepted_tokens=accepted,
                     verify_steps=steps)


def make_llm(model, args, device, max_batch: int, **spec) -> LLM:
    tokens = max_batch * (args.prompt + args.new + 2 * args.draft_len + 64)
    return LLM(model, tokenizer=None, device=device, kv_cache_config=KvCacheConfig(max_tokens=tokens),
               build_config=BuildConfig(max_batch_size=max_batch, max_num_tokens=max(2048, max_batch * 16),
                                        max_seq_len=args.prompt + args.new + 64), **spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (the default without a GPU)")
    ap.add_argument("--new", type=int, default=None, help="new tokens a request (128; smoke 24)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (128; smoke 32)")
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--large-batch", type=int, default=None, help="the draft-model batch row (32; smoke 4)")
    ap.add_argument("--no-verify-graphs", action="store_true",
                    help="verify steps without CUDA graphs (the configs' verify_cuda_graphs=False)")
    ap.add_argument("--only", choices=["draft", "ngram", "eagle", "random"], action="append",
                    help="run these workloads only (repeatable; default all)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype, shape = ("cuda", torch.bfloat16, LLAMA31_8B) if cuda else ("cpu", torch.float32, SMOKE)
    args.new = args.new or (128 if cuda else 24)
    args.prompt = args.prompt or (128 if cuda else 32)
    large = args.large_batch or (32 if cuda else 4)
    k = args.draft_len

    target, draft = zeroed_target_and_draft(shape, device, dtype)
    cycle = periodic_phrase(target, PHRASE, seed=6)  # before any engine reads the head
    random_draft = random_llama(shape, DRAFT_LAYERS, seed=1, device=device, dtype=dtype)
    vocab = shape["vocab_size"]
    graphs = None if not args.no_verify_graphs else False  # None: the engine's default (graphs on a GPU)
    workloads = [  # key, name, speculative config, [(row name's suffix, prompts)]: one engine per config
        ("draft", "draft model, ~100% acceptance",
         DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir=draft, verify_cuda_graphs=graphs),
         [("", prompts(1, args.prompt, vocab, 0)), ("", prompts(large, args.prompt, vocab, 1))]),
        ("ngram", "n-gram",
         NGramDecodingConfig(max_draft_len=k, max_matching_ngram_size=3, verify_cuda_graphs=graphs),
         [(", periodic text (~100% acceptance)", [repeated(cycle, args.prompt)]),
          (", repeated random phrase (~0%)", prompts(1, args.prompt, vocab, 2, periodic=True))]),
        ("eagle", "EAGLE-3 head, random weights (~0% acceptance)",
         EagleDecodingConfig(max_draft_len=k, speculative_model_dir=random_eagle3(shape, device, dtype),
                             verify_cuda_graphs=graphs),
         [("", prompts(1, args.prompt, vocab, 4)), ("", prompts(large, args.prompt, vocab, 5))]),
        ("random", "random draft, ~0% acceptance",
         DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir=random_draft, verify_cuda_graphs=graphs),
         [("", prompts(1, args.prompt, vocab, 3))]),
    ]
    workloads = [w[1:] for w in workloads if not args.only or w[0] in args.only]
    rows, record = [], {"device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape,
                        "new": args.new, "prompt": args.prompt, "draft_len": k, "verify_graphs": graphs, "rows": []}
    plain = make_llm(target, args, device, large)
    for name, config, batches in workloads:
        with make_llm(target, args, device, large, speculative_config=config) as llm:
            for suffix, batch in batches:
                row, full = measured_row(plain, llm, name + suffix, batch, args.new, k, "spec tok/s",
                                         {"verify graphs": "no" if graphs is False else "default"})
                rows.append(row)
                record["rows"].append(full)
    plain.shutdown()
    report("bench_speculative", markdown(rows), record)


if __name__ == "__main__":
    main()

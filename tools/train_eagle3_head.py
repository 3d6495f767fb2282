#!/usr/bin/env python
"""Train an EAGLE-3 draft head for the built-in demo model, saved in the published checkpoint layout.

    python tools/train_eagle3_head.py --out trtllm/demo_model/eagle3                  # ~24 min on 1 CPU thread
    python tools/train_eagle3_head.py --out /tmp/eagle3 --time-limit 600              # shorter training
    python tools/train_eagle3_head.py --smoke --out /tmp/eagle3                       # < 1 min on a CPU

Reproducible: one --seed fixes the generated training text, the initialisation and the
batch order (the --time-limit stop makes the number of steps, and so the result, depend
on the machine's speed; give --time-limit 0 and --steps N for a bit-reproducible run).

Steps:
1. Self-distillation data: the target (transformers' LlamaForCausalLM on the demo
   checkpoint, fp32) generates --sequences sequences of at most --seq-len tokens from
   <|bos|> (a --chat-fraction of them from a chat prompt): half sampled at --temperature
   (top-k 50) throughout, half sampled for a random 2-24 tokens and then greedy. For every
   position it records h_t = concat(out_1, out_2, out_4) (outputs of target decoder layers
   --layer-ids, 0-based; hidden_states[i+1] in HF terms) and the target's next-token
   distribution (its top --top-k probabilities). No corpus text is used, so the held-out
   entries of trtllm/demo_model/heldout_sample.txt stay unseen.
2. Draft vocabulary: the --draft-vocab most frequent target tokens of that data (sorted by
   id): d2t[d] = target_id - d, t2d[target_id] = in the draft vocabulary.
3. The head (`Eagle3Head`: fc [H, 3H], one decoder layer whose attention reads
   cat(input_layernorm(embed(x_{t+1})), hidden_norm(g_t)), norm, lm_head [Vd, H]; the
   target's frozen embedding) is trained with AdamW on the soft cross-entropy against the
   target's distribution restricted to the draft vocabulary, with --ttt-steps unrolled
   steps of "training-time test" exactly as inference runs them: step j's position for
   prefix end i has token x_{i+j}, hidden = step j-1's prenorm output there, rope position
   i+j-1, and attends to step 1's keys 0..i plus steps 2..j's keys for that same i; step j's
   loss is weighted --ttt-decay^(j-1). lm_head and norm start from the target's (tied)
   lm_head rows and final norm. The unrolled training forward is checked against the
   step-by-step inference path (`Eagle3Head.propose`) before training.
4. Write --out: config.json, model.safetensors (bf16; d2t int64, t2d bool; no
   embed_tokens), training.json; reload the file and check every tensor's name, shape and
   dtype.
5. Evaluate the reloaded weights (fp32 compute): greedy speculative decoding with k=--k on
   the held-out entries' first --prompt-tokens tokens, --new-tokens tokens each; acceptance
   length = mean over steps of (accepted + 1), and per-position acceptance rates.

The EAGLE-3 forward (what an engine implements): for N known tokens, draft step 1 runs
positions t = 0..N-2 with (x_{t+1}, g_t = fc(h_t)), rope at t, causal attention; its last
argmax (mapped by d2t) is d1. Step j >= 2 appends position N-3+j with token d_{j-1} and
g = the previous step's prenorm output (H wide, not through fc), attending to all earlier
draft positions. r = o_proj(attn) + g; prenorm = mlp(post_attention_layernorm(r)) + r;
logits = lm_head(norm(prenorm)).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing (PYTHONPATH=$PWD works too)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from trtllm.demo import HELDOUT_SAMPLE, demo_model_path, read_entries  # noqa: E402

CHAT_PROMPTS = ["Tell me a fortune.", "Tell me something funny.", "Say something wise.",
                "Give me a quote.", "What is my fortune?", "Tell me a joke.", "Cheer me up."]
SAMPLE_TOP_K = 50  # sampled generation: top-k 50 at --temperature
MAX_WEIGHT_BYTES = 4 * 2**20

PRESETS = {
    # 1 CPU thread: generation ~4.5 min (~270k tokens), training --time-limit 17 min, evaluation ~1 min.
    "cpu": dict(sequences=8000, seq_len=128, steps=100_000, time_limit=1020.0, batch_size=32, lr=2e-3,
                warmup=50, draft_vocab=2048, intermediate=768, eval_prompts=0, new_tokens=64),
    "smoke": dict(sequences=64, seq_len=48, steps=20, time_limit=0.0, batch_size=8, lr=2e-3,
                  warmup=4, draft_vocab=1024, intermediate=768, eval_prompts=3, new_tokens=16),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="EAGLE-3 checkpoint directory to write (replaced)")
    p.add_argument("--target", type=Path, default=None, help="target checkpoint (default: the demo model)")
    p.add_argument("--smoke", action="store_true", help="tiny data, few steps (a quick CPU check)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    for name, typ in [("sequences", int), ("seq-len", int), ("steps", int), ("time-limit", float),
                      ("batch-size", int), ("lr", float), ("warmup", int), ("draft-vocab", int),
                      ("intermediate", int), ("eval-prompts", int), ("new-tokens", int)]:
        p.add_argument(f"--{name}", type=typ, default=None, help="overrides the preset")
    p.add_argument("--layer-ids", default="1,2,4", help="target decoder layers (0-based) whose outputs h_t concatenates")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of the generated data")
    p.add_argument("--greedy-fraction", type=float, default=0.5,
                   help="sequences sampled for 2-24 tokens, then greedy")
    p.add_argument("--chat-fraction", type=float, default=0.1, help="generation batches started from a chat prompt")
    p.add_argument("--gen-batch", type=int, default=64, help="sequences generated together")
    p.add_argument("--top-k", type=int, default=8, help="target probabilities kept per position (the soft labels)")
    p.add_argument("--val-fraction", type=float, default=0.04, help="generated sequences kept for validation")
    p.add_argument("--ttt-steps", type=int, default=3, help="unrolled draft steps trained (training-time test)")
    p.add_argument("--ttt-decay", type=float, default=0.8, help="step j's loss weight is decay^(j-1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    p.add_argument("--k", type=int, default=4, help="draft tokens per step in the evaluation")
    p.add_argument("--prompt-tokens", type=int, default=8, help="evaluation prompt: <|bos|> + this many tokens")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250, help="validation loss every this many steps")
    args = p.parse_args(argv)
    args.preset = "smoke" if args.smoke else "cpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.time_limit = args.time_limit or None
    args.layer_ids = [int(x) for x in args.layer_ids.split(",")]
    args.target = args.target or demo_model_path()
    return args


# ---------------------------------------------------------------- target and data

def load_target(path: Path):
    """transformers' LlamaForCausalLM on the target checkpoint, fp32, eval; and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


class LayerTap:
    """Forward hooks keeping the outputs of the given decoder layers; `.hidden()` -> [B, S, n*H]."""

    def __init__(self, model, layer_ids: list[int]):
        self.outs: dict[int, torch.Tensor] = {}
        self.layer_ids = layer_ids
        self.handles = [model.model.layers[i].register_forward_hook(self._hook(i)) for i in layer_ids]

    def _hook(self, i):
        def hook(module, inputs, output):
            self.outs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def hidden(self) -> torch.Tensor:
        return torch.cat([self.outs[i] for i in self.layer_ids], dim=-1)

    def remove(self):
        for h in self.handles:
            h.remove()


def check_tap(model, layer_ids: list[int]) -> None:
    """The tapped layer outputs are HF's output_hidden_states[i + 1] (not the final-norm last element)."""
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    tap = LayerTap(model, layer_ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    got, want = tap.hidden(), torch.cat([hs[i + 1] for i in layer_ids], -1)
    tap.remove()
    assert torch.equal(got, want), "layer taps differ from output_hidden_states[i + 1]"


@torch.no_grad()
def generate_batch(model, tap: LayerTap, prompt: list[int], greedy_from: torch.Tensor, max_len: int,
                   args, gen: torch.Generator, eos: int) -> list[dict]:
    """Rows continuing `prompt` (sampled until position greedy_from[row], greedy after), with the
    target's h_t and top-k next-token probabilities at every position. A row ends after <|eos|>
    (and leaves the batch: its cache rows are dropped) or at max_len tokens."""
    rows, p_len = greedy_from.numel(), len(prompt)
    tokens = torch.zeros(rows, max_len, dtype=torch.long)
    tokens[:, :p_len] = torch.tensor(prompt)
    hidden = torch.zeros(rows, max_len, len(args.layer_ids) * model.config.hidden_size, dtype=torch.bfloat16)
    top_p = torch.zeros(rows, max_len, args.top_k, dtype=torch.float16)
    top_i = torch.zeros(rows, max_len, args.top_k, dtype=torch.int16)
    length = torch.full((rows,), max_len)
    active = torch.arange(rows)  # rows still generating, in cache order
    out = model(input_ids=tokens[:, :p_len], use_cache=True)
    n = p_len  # tokens known to every active row; the last forward covered positions up to n-1
    while True:
        logits = out["logits"].float()  # [active, S, V]
        p, i = logits.softmax(-1).topk(args.top_k, dim=-1)
        s = logits.shape[1]
        hidden[active, n - s: n] = tap.hidden().to(torch.bfloat16)
        top_p[active, n - s: n], top_i[active, n - s: n] = p.half(), i.short()
        if n >= max_len:
            break
        last = logits[:, -1] / args.temperature
        kth = last.topk(SAMPLE_TOP_K).values[:, -1:]
        sampled = torch.multinomial(last.masked_fill(last < kth, float("-inf")).softmax(-1), 1, generator=gen)[:, 0]
        nxt = torch.where(greedy_from[active] <= n, last.argmax(-1), sampled)
        tokens[active, n] = nxt
        n += 1
        ended = nxt == eos
        length[active[ended]] = n
        if ended.all():
            break
        keep = (~ended).nonzero()[:, 0]
        if ended.any():
            out["cache" if "cache" in out else "past_key_values"].batch_select_indices(keep)
            active, nxt = active[keep], nxt[keep]
        out = decode_step(model, nxt[:, None], out)
    return [{"tokens": tokens[r, :length[r]].clone(), "hidden": hidden[r, :length[r]].clone(),
             "top_p": top_p[r, :length[r]].clone(), "top_i": top_i[r, :length[r]].clone()} for r in range(rows)]


def decode_step(model, ids: torch.Tensor, out):
    """One cached forward of ids after `out` (transformers >= 5.2x calls the cache `cache`, before `past_key_values`)."""
    if "cache" in out:
        return model(input_ids=ids, cache=out["cache"], use_cache=True)
    return model(input_ids=ids, past_key_values=out["past_key_values"], use_cache=True)


def chat_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered)["input_ids"]  # <|bos|> first


def generate_data(model, tokenizer, args) -> list[dict]:
    """--sequences generated sequences (see the module docstring), in batches of --gen-batch."""
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tap = LayerTap(model, args.layer_ids)
    data, t0 = [], time.time()
    n_batches = math.ceil(args.sequences / args.gen_batch)
    for b in range(n_batches):
        rows = min(args.gen_batch, args.sequences - b * args.gen_batch)
        chat = rng.random() < args.chat_fraction
        prompt = chat_prompt(tokenizer, rng.choice(CHAT_PROMPTS)) if chat else [tokenizer.bos_token_id]
        greedy_from = torch.tensor([len(prompt) + rng.randint(2, 24) if rng.random() < args.greedy_fraction
                                    else 1 << 30 for _ in range(rows)])
        data += generate_batch(model, tap, prompt, greedy_from, args.seq_len, args, gen, tokenizer.eos_token_id)
        if (b + 1) % 10 == 0 or b + 1 == n_batches:
            n_tok = sum(d["tokens"].numel() for d in data)
            print(f"generated {len(data)}/{args.sequences} sequences, {n_tok:,} tokens, {time.time() - t0:.0f}s",
                  flush=True)
    tap.remove()
    return data


def draft_vocabulary(data: list[dict], vocab_size: int, draft_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [Vd] int64, t2d [V] bool): the draft_vocab most frequent tokens of the data, sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for d in data:
        counts += torch.bincount(d["tokens"], minlength=vocab_size)
    ids = counts.topk(draft_vocab).indices.sort().values
    d2t = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


# ---------------------------------------------------------------- the head

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama rotate_half rope; x [..., S, hd], positions [S] (or broadcastable)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs = positions.float()[..., None] * inv_freq  # [S, hd/2]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, hd = cfg["hidden_size"], cfg["head_dim"]
        self.heads, self.kv_heads, self.hd, self.theta = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                                          hd, cfg["rope_theta"])
        self.q_proj = nn.Linear(2 * h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)

    def qkv(self, hcat: torch.Tensor, positions: torch.Tensor):
        """hcat [B, S, 2H] -> q [B, heads, S, hd], k and v [B, heads, S, hd] (kv heads repeated), roped."""
        b, s, _ = hcat.shape
        q = self.q_proj(hcat).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(hcat).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(hcat).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return rope(q, positions, self.theta), rope(k, positions, self.theta), v

    def out(self, a: torch.Tensor) -> torch.Tensor:
        """a [B, heads, S, hd] -> o_proj [B, S, H]."""
        b, _, s, _ = a.shape
        return self.o_proj(a.transpose(1, 2).reshape(b, s, self.heads * self.hd))


class MLP(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(h, cfg["intermediate_size"])


class Eagle3Head(nn.Module):
    """The EAGLE-3 draft head; state_dict() is the published layout (the embedding is the target's, not saved)."""

    def __init__(self, cfg: dict, embed: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor):
        super().__init__()
        h = cfg["hidden_size"]
        self.cfg = cfg
        self.fc = nn.Linear(3 * cfg["target_hidden_size"], h, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(h, cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(h, cfg["draft_vocab_size"], bias=False)
        self.register_buffer("d2t", d2t.clone())
        self.register_buffer("t2d", t2d.clone())
        self.register_buffer("embed", embed.detach().float().clone(), persistent=False)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def qkv(self, tokens: torch.Tensor, g: torch.Tensor, positions: torch.Tensor):
        m = self.midlayer
        hcat = torch.cat([m.input_layernorm(self.embed[tokens]), m.hidden_norm(g)], -1)
        return m.self_attn.qkv(hcat, positions)

    def finish(self, a: torch.Tensor, g: torch.Tensor):
        """Attention output a [B, heads, S, hd] and hidden input g -> (prenorm [B, S, H], logits [B, S, Vd])."""
        m = self.midlayer
        r = m.self_attn.out(a) + g
        prenorm = m.mlp(m.post_attention_layernorm(r)) + r
        return prenorm, self.lm_head(self.norm(prenorm))

    def unrolled(self, tokens: torch.Tensor, hidden: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test. tokens [B, T], hidden [B, T, 3H] -> per step j = 1..steps logits [B, T-1, Vd];
        step j's index i is the draft position i+j-1 for a prefix ending at x_{i+1}: its token is x_{i+j}
        (0 past the end), it predicts x_{i+j+1}, i.e. matches the target's distribution at position i+j."""
        b, t = tokens.shape
        n = t - 1
        padded = torch.cat([tokens, tokens.new_zeros(b, steps)], 1)
        g = self.fc(hidden[:, :n])
        idx = torch.arange(n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scale = 1.0 / math.sqrt(self.cfg["head_dim"])
        logits, diag_k, diag_v = [], [], []
        for j in range(1, steps + 1):
            q, k, v = self.qkv(padded[:, j: j + n], g, idx + j - 1)
            if j == 1:
                k1, v1 = k, v
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # step 1's keys 0..i, then steps 2..j at the same i
                diag_k.append(k)
                diag_v.append(v)
                main = (q @ k1.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
                diag = torch.stack([(q * dk).sum(-1) * scale for dk in diag_k], -1)  # [B, heads, n, j-1]
                p = torch.cat([main, diag], -1).softmax(-1)
                a = p[..., :n] @ v1 + sum(p[..., n + m, None] * dv for m, dv in enumerate(diag_v))
            g, step_logits = self.finish(a, g)
            logits.append(step_logits)
        return logits

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, hidden: torch.Tensor, k: int, forced: list[int] | None = None):
        """Inference, as an engine runs it. tokens [N] known (N >= 2), hidden [>= N-1, 3H] the target's h_t;
        returns (k draft target ids, [k] logits). forced: use these tokens as steps 2..k's inputs instead
        of the drafts (for checking `unrolled`)."""
        n = tokens.numel() - 1
        g = self.fc(hidden[None, :n].float())
        q, kk, vv = self.qkv(tokens[None, 1:], g, torch.arange(n))
        a = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        prenorm, logits = self.finish(a, g)
        drafts, all_logits = [], []
        for j in range(1, k + 1):
            all_logits.append(logits[0, -1])
            drafts.append(self.draft_to_target(logits[0, -1].argmax()).item())
            if j == k:
                break
            g = prenorm[:, -1:]
            tok = forced[j - 1] if forced is not None else drafts[-1]
            q, k_new, v_new = self.qkv(torch.tensor([[tok]]), g, torch.tensor([n - 1 + j]))
            kk, vv = torch.cat([kk, k_new], 2), torch.cat([vv, v_new], 2)
            prenorm, logits = self.finish(F.scaled_dot_product_attention(q, kk, vv), g)
        return drafts, all_logits


def head_config(args, target_cfg) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": target_cfg.hidden_size, "intermediate_size": args.intermediate,
        "num_hidden_layers": 1, "num_attention_heads": target_cfg.num_attention_heads,
        "num_key_value_heads": target_cfg.num_key_value_heads, "head_dim": target_cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": target_cfg.rms_norm_eps, "rope_theta": 10000.0,
        "max_position_embeddings": target_cfg.max_position_embeddings, "vocab_size": target_cfg.vocab_size,
        "draft_vocab_size": args.draft_vocab, "target_hidden_size": target_cfg.hidden_size,
        "eagle_aux_hidden_state_layer_ids": args.layer_ids, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def build_head(cfg: dict, target, d2t: torch.Tensor, t2d: torch.Tensor) -> Eagle3Head:
    """lm_head from the target's (tied) lm_head rows of the draft vocabulary, norm from its final norm."""
    head = Eagle3Head(cfg, target.model.embed_tokens.weight, d2t, t2d)
    with torch.no_grad():
        head.lm_head.weight.copy_(target.lm_head.weight[t2d.nonzero()[:, 0]])
        head.norm.weight.copy_(target.model.norm.weight)
    return head


def check_unrolled_matches_propose(head: Eagle3Head, sample: dict, steps: int) -> float:
    """The training forward's step j at a prefix end equals the inference path's step j (drafts forced)."""
    tokens, hidden = sample["tokens"], sample["hidden"].float()
    n_known = min(tokens.numel() - steps, 12)
    with torch.no_grad():
        logits = head.unrolled(tokens[None], hidden[None], steps)
    _, ref = head.propose(tokens[:n_known], hidden[: n_known - 1], steps,
                          forced=tokens[n_known: n_known + steps - 1].tolist())
    diff = max((logits[j][0, n_known - 2] - ref[j]).abs().max().item() for j in range(steps))
    assert diff < 1e-4, f"unrolled training forward and inference differ by {diff}"
    return diff


# ---------------------------------------------------------------- training

def collate(batch: list[dict], t2d_index: torch.Tensor, eos: int):
    """Padded tokens [B, T], hidden [B, T, 3H] (fp32), soft labels q [B, T, Vd] (the target's top-k
    probabilities at each position restricted to the draft vocabulary, renormalised), target argmax in
    draft ids [B, T] (-1: not in it), valid [B, T] (position exists, is not <|eos|>, has label mass)."""
    t = max(d["tokens"].numel() for d in batch)
    b, vd = len(batch), int((t2d_index >= 0).sum())
    tokens = torch.zeros(b, t, dtype=torch.long)
    hidden = torch.zeros(b, t, batch[0]["hidden"].shape[-1])
    q = torch.zeros(b, t, vd)
    argmax = torch.full((b, t), -1, dtype=torch.long)
    valid = torch.zeros(b, t, dtype=torch.bool)
    for r, d in enumerate(batch):
        n = d["tokens"].numel()
        tokens[r, :n], hidden[r, :n] = d["tokens"], d["hidden"].float()
        di = t2d_index[d["top_i"].long()]  # [n, K]
        p = d["top_p"].float() * (di >= 0)
        q[r, :n].scatter_add_(-1, di.clamp(min=0), p)
        argmax[r, :n] = di[:, 0]
        valid[r, :n] = (d["tokens"] != eos) & (p.sum(-1) > 0)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-9)
    return tokens, hidden, q, argmax, valid


def ttt_loss(head: Eagle3Head, batch, args) -> tuple[torch.Tensor, list[float], list[float]]:
    """Weighted soft cross-entropy over the unrolled steps; also per-step loss and top-1 accuracy."""
    tokens, hidden, q, argmax, valid = batch
    logits = head.unrolled(tokens, hidden, args.ttt_steps)
    n = tokens.shape[1] - 1
    total, losses, accs = 0.0, [], []
    for j, lg in enumerate(logits, start=1):
        pad = max(0, j + n - q.shape[1])
        qj = F.pad(q, (0, 0, 0, pad))[:, j: j + n]
        vj = F.pad(valid, (0, pad))[:, j: j + n]
        aj = F.pad(argmax, (0, pad), value=-1)[:, j: j + n]
        ce = -(qj * lg.float().log_softmax(-1)).sum(-1)
        loss = (ce * vj).sum() / vj.sum().clamp(min=1)
        total = total + args.ttt_decay ** (j - 1) * loss
        losses.append(loss.item())
        accs.append(((lg.argmax(-1) == aj) & vj).sum().item() / max(1, vj.sum().item()))
    return total, losses, accs


def length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar lengths (little padding), in random order."""
    keys = [(n, rng.random(), i) for i, n in enumerate(lengths)]
    order = [i for _, _, i in sorted(keys)]
    batches = [order[b: b + batch_size] for b in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, args, progress: float) -> float:
    """Linear warmup over --warmup steps, then cosine to min_lr_ratio * lr at progress 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def progress_at(step: int, elapsed: float, args) -> float:
    """Fraction of the run done: by steps, or by --time-limit when that comes first."""
    p = step / args.steps
    if args.time_limit:
        p = max(p, elapsed / args.time_limit)
    return min(1.0, p)


@torch.no_grad()
def validate(head: Eagle3Head, val: list[dict], t2d_index: torch.Tensor, eos: int, args) -> dict:
    losses, accs, n = [0.0] * args.ttt_steps, [0.0] * args.ttt_steps, 0
    for i in range(0, len(val), args.batch_size):
        chunk = val[i: i + args.batch_size]
        _, chunk_losses, a = ttt_loss(head, collate(chunk, t2d_index, eos), args)
        losses = [x + y * len(chunk) for x, y in zip(losses, chunk_losses)]
        accs = [x + y * len(chunk) for x, y in zip(accs, a)]
        n += len(chunk)
    return {"val_loss": [round(x / n, 4) for x in losses], "val_top1": [round(x / n, 4) for x in accs]}


def train(head: Eagle3Head, train_data: list[dict], val: list[dict], eos: int, args) -> dict:
    t2d_index = torch.cumsum(head.t2d.long(), 0) - 1
    t2d_index[~head.t2d] = -1
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    rng = random.Random(args.seed + 1)
    lengths = [d["tokens"].numel() for d in train_data]
    order: list[list[int]] = []
    history, t0, eval_s, step, last = [], time.time(), 0.0, 0, False
    head.train()
    while not last:
        lr = lr_at(step, args, progress_at(step, time.time() - t0 - eval_s, args))
        for group in opt.param_groups:
            group["lr"] = lr
        if not order:
            order = length_batches(lengths, args.batch_size, rng)
        idx = order.pop()
        loss, losses, accs = ttt_loss(head, collate([train_data[i] for i in idx], t2d_index, eos), args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        last = progress_at(step, time.time() - t0 - eval_s, args) >= 1.0
        if step % args.log_every == 0 or last:
            print(f"step {step:5d}  loss {loss.item():.3f}  per step {[round(x, 3) for x in losses]}  "
                  f"top1 {[round(x, 3) for x in accs]}  lr {lr:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if step % args.eval_every == 0 or last:
            t_eval = time.time()
            head.eval()
            v = validate(head, val, t2d_index, eos, args)
            head.train()
            eval_s += time.time() - t_eval
            history.append({"step": step, "train_loss": round(loss.item(), 4),
                            "train_loss_per_step": [round(x, 4) for x in losses], **v,
                            "seconds": round(time.time() - t0, 1)})
            print(f"step {step:5d}  validation loss {v['val_loss']}  top1 {v['val_top1']}", flush=True)
    head.eval()
    return {"steps_done": step, "train_seconds": round(time.time() - t0, 1), "eval_seconds": round(eval_s, 1),
            "final_train_loss": round(loss.item(), 4), "history": history}


# ---------------------------------------------------------------- saving and checking

def expected_tensors(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The published EAGLE-3 layout: name -> (shape, dtype)."""
    h, i, vd, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["draft_vocab_size"], cfg["vocab_size"]
    qd, kvd, bf = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"], \
        torch.bfloat16
    m = "midlayer."
    return {
        "fc.weight": ((h, 3 * cfg["target_hidden_size"]), bf),
        m + "input_layernorm.weight": ((h,), bf), m + "hidden_norm.weight": ((h,), bf),
        m + "post_attention_layernorm.weight": ((h,), bf),
        m + "self_attn.q_proj.weight": ((qd, 2 * h), bf), m + "self_attn.k_proj.weight": ((kvd, 2 * h), bf),
        m + "self_attn.v_proj.weight": ((kvd, 2 * h), bf), m + "self_attn.o_proj.weight": ((h, qd), bf),
        m + "mlp.gate_proj.weight": ((i, h), bf), m + "mlp.up_proj.weight": ((i, h), bf),
        m + "mlp.down_proj.weight": ((h, i), bf),
        "norm.weight": ((h,), bf), "lm_head.weight": ((vd, h), bf),
        "d2t": ((vd,), torch.int64), "t2d": ((v,), torch.bool),
    }


def save_head(out: Path, head: Eagle3Head) -> None:
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    state = {k: (v if v.dtype in (torch.int64, torch.bool) else v.to(torch.bfloat16)).contiguous()
             for k, v in head.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(head.cfg, indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_WEIGHT_BYTES:
        raise SystemExit(f"model.safetensors is {size / 2**20:.1f} MiB, over the {MAX_WEIGHT_BYTES >> 20} MiB limit")


def reload_head(out: Path, target) -> tuple[Eagle3Head, dict]:
    """Read the directory back: every tensor's name, shape and dtype as the layout says; a head on it."""
    from safetensors.torch import load_file

    cfg = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    want = expected_tensors(cfg)
    assert set(state) == set(want), f"tensor names differ: extra {set(state) - set(want)}, " \
                                    f"missing {set(want) - set(state)}"
    for name, (shape, dtype) in want.items():
        assert tuple(state[name].shape) == shape and state[name].dtype == dtype, \
            f"{name}: {tuple(state[name].shape)} {state[name].dtype}, want {shape} {dtype}"
    d2t, t2d = state["d2t"], state["t2d"]
    ids = d2t + torch.arange(d2t.numel())
    assert torch.equal(t2d.nonzero()[:, 0], ids), "d2t and t2d disagree"
    head = Eagle3Head(cfg, target.model.embed_tokens.weight, d2t, t2d)
    head.load_state_dict({k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}, strict=True)
    print(f"reload check: {len(state)} tensors, names / shapes / dtypes as the EAGLE-3 layout; d2t matches t2d")
    return head.eval(), {name: [list(shape), str(dtype).replace("torch.", "")]
                         for name, (shape, dtype) in want.items()}


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def greedy_with_hidden(target, tap: LayerTap, prompt: list[int], new_tokens: int, eos: int):
    """The target's greedy continuation (stopping after <|eos|>) and h_t over prompt + continuation."""
    ids = torch.tensor([prompt])
    out = target(input_ids=ids, use_cache=True)
    cont = []
    for _ in range(new_tokens):
        nxt = out.logits[0, -1].argmax().item()
        cont.append(nxt)
        if nxt == eos:
            break
        out = decode_step(target, torch.tensor([[nxt]]), out)
    target(torch.tensor([prompt + cont]))
    return cont, tap.hidden()[0]


@torch.no_grad()
def speculate(head: Eagle3Head, prompt: list[int], cont: list[int], hidden: torch.Tensor, k: int) -> list[int]:
    """Greedy speculative decoding of `cont` after `prompt`: per step, the number of drafts accepted."""
    seq = prompt + cont
    n, end, accepted = len(prompt) + 1, len(seq), []  # known: prompt + the prefill's token
    while n < end:
        drafts, _ = head.propose(torch.tensor(seq[:n]), hidden[: n - 1], k)
        a = 0
        while a < k and n + a < end and drafts[a] == seq[n + a]:
            a += 1
        accepted.append(a)
        n += a + 1
    return accepted


def evaluate(target, tokenizer, head: Eagle3Head, args) -> dict:
    entries = read_entries(Path(args.target) / HELDOUT_SAMPLE)
    if args.eval_prompts:
        entries = entries[: args.eval_prompts]
    tap = LayerTap(target, args.layer_ids)
    eos = tokenizer.eos_token_id
    accepted = []
    for entry in entries:
        prompt = tokenizer(entry)["input_ids"][: args.prompt_tokens + 1]  # <|bos|> first
        cont, hidden = greedy_with_hidden(target, tap, prompt, args.new_tokens, eos)
        accepted += speculate(head, prompt, cont, hidden, args.k)
    tap.remove()
    steps = len(accepted)
    at_least = [sum(a >= j for a in accepted) / steps for j in range(1, args.k + 1)]
    conditional = [at_least[0]] + [at_least[j] / at_least[j - 1] if at_least[j - 1] else 0.0
                                   for j in range(1, args.k)]
    return {"prompts": len(entries), "steps": steps, "k": args.k,
            "acceptance_length": round(sum(a + 1 for a in accepted) / steps, 4),
            "tokens": sum(a + 1 for a in accepted),
            "accepted_at_least_j": [round(x, 4) for x in at_least],
            "per_position_conditional": [round(x, 4) for x in conditional],
            "method": f"held-out entries of {HELDOUT_SAMPLE}: <|bos|> + first {args.prompt_tokens} tokens, "
                      f"the target's greedy continuation of up to {args.new_tokens} tokens (to <|eos|>); from "
                      f"prompt + the prefill's token, each step drafts k={args.k} (propose: step 1 over the "
                      "known prefix, then k-1 appended steps) and accepts the prefix matching the target's "
                      "greedy tokens, + 1 target token; acceptance length = mean over steps of (accepted + 1). "
                      "Saved (bf16) weights, fp32 compute."}


def versions() -> dict:
    import safetensors
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__}


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    target, tokenizer = load_target(args.target)
    for p in target.parameters():
        p.requires_grad_(False)
    check_tap(target, args.layer_ids)
    eos = tokenizer.eos_token_id

    t_gen = time.time()
    data = generate_data(target, tokenizer, args)
    gen_seconds = time.time() - t_gen
    n_val = max(1, round(args.val_fraction * len(data)))
    val, train_data = data[:n_val], data[n_val:]
    d2t, t2d = draft_vocabulary(train_data, target.config.vocab_size, args.draft_vocab)
    all_top1 = torch.cat([d["top_i"][:, 0].long() for d in train_data])
    coverage = {"tokens": round(t2d[torch.cat([d["tokens"] for d in train_data])].float().mean().item(), 4),
                "target_argmax": round(t2d[all_top1].float().mean().item(), 4)}
    n_tokens = sum(d["tokens"].numel() for d in train_data)
    print(f"data: {len(train_data)} train sequences ({n_tokens:,} tokens), {len(val)} validation; "
          f"{gen_seconds:.0f}s; draft vocabulary {args.draft_vocab} covers {coverage}")

    cfg = head_config(args, target.config)
    head = build_head(cfg, target, d2t, t2d)
    diff = check_unrolled_matches_propose(head, max(val, key=lambda d: d["tokens"].numel()), args.ttt_steps)
    n_params = sum(p.numel() for p in head.parameters())
    print(f"head: {n_params / 1e6:.2f}M parameters; unrolled vs propose max |logit diff| {diff:.1e}")

    stats = train(head, train_data, val, eos, args)

    out = args.out.resolve()
    save_head(out, head)
    loaded, layout = reload_head(out, target)
    result = evaluate(target, tokenizer, loaded, args)
    print(f"acceptance length {result['acceptance_length']:.3f} (k={args.k}, {result['steps']} steps, "
          f"{result['prompts']} prompts); accepted >= j: {result['accepted_at_least_j']}; "
          f"per position (conditional): {result['per_position_conditional']}")

    record = {
        "seed": args.seed,
        "preset": args.preset,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "train_eagle3_head.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "target": "trtllm/demo_model (transformers LlamaForCausalLM, fp32)",
        "head": {"parameters": n_params, "intermediate_size": args.intermediate,
                 "draft_vocab_size": args.draft_vocab, "eagle_aux_hidden_state_layer_ids": args.layer_ids,
                 "weights_bytes": (out / "model.safetensors").stat().st_size,
                 "init": "lm_head = target lm_head rows of the draft vocabulary, norm = target final norm, "
                         "the rest torch defaults"},
        "data": {"sequences": len(data), "train_sequences": len(train_data), "validation_sequences": len(val),
                 "train_tokens": n_tokens, "max_seq_len": args.seq_len, "temperature": args.temperature,
                 "sample_top_k": SAMPLE_TOP_K, "greedy_fraction": args.greedy_fraction,
                 "chat_fraction": args.chat_fraction, "soft_label_top_k": args.top_k,
                 "draft_vocab_coverage": coverage, "generation_seconds": round(gen_seconds, 1)},
        "training": {"loss": "soft cross-entropy against the target's top-k distribution restricted to the "
                             "draft vocabulary; training-time test over the unrolled steps, step j weighted "
                             f"{args.ttt_decay}^(j-1)",
                     "ttt_steps": args.ttt_steps, "ttt_decay": args.ttt_decay, "max_steps": args.steps,
                     "time_limit_s": args.time_limit, "batch_size": args.batch_size, "lr": args.lr,
                     "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
                     "optimizer": "AdamW(0.9, 0.95), cosine, grad clip 1.0",
                     "unrolled_vs_propose_max_abs_logit_diff": diff, **stats},
        "evaluation": result,
        "reload_check": {"ok": True, "tensors": layout},
        "versions": versions(),
    }
    record["wall_seconds"] = round(time.time() - t_start, 1)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} in {record['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()

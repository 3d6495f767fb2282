#!/usr/bin/env python
"""Train the built-in demo model: a small Llama and its byte-level BPE tokenizer on fortunes.

    tools/fetch_corpus.sh                       # data/fortunes.txt + data/corpus.json
    python tools/train_demo_model.py --device cuda --out trtllm/demo_model      # GPU, ~2-4 min on an H100
    python tools/train_demo_model.py --device cpu --threads 1 --out trtllm/demo_model   # ~12 min on a CPU
    python tools/train_demo_model.py --smoke --out /tmp/demo                    # < 1 min on a CPU

Reproducible: one --seed fixes the train / validation / held-out split (by entry), the
tokenizer (trained on the train split only), the initialisation, the data order and the
dropout masks (CUDA kernels may still differ in the last bits from run to run).

Steps: split the corpus entries 90 / 5 / 5 (train / validation / held-out); train the
tokenizer; pack the train split into one stream (<|bos|> entry <|eos|> ..., a tenth of the
entries wrapped in the chat template as the answer to a "tell me a fortune" request, so
the chat endpoint answers with a fortune); train `trtllm.models.llama.LlamaForCausalLM`
on random windows of it (AdamW, warmup + cosine, bf16 autocast on CUDA, dropout applied
through forward hooks so the model definition stays the project's own); keep the
weights with the best validation perplexity; write an HF checkpoint directory (bf16
weights, tied embeddings saved once) with the tokenizer, a chat template,
heldout_sample.txt, corpus.json and training.json; reload it with `trtllm.load_model`,
`AutoTokenizer` (and transformers' own LlamaForCausalLM) and check the logits; measure
held-out perplexity on the reloaded weights, in fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
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

from trtllm.demo import HELDOUT_SAMPLE, greedy_generate, pack, perplexity, read_entries  # noqa: E402
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message is "<|role|>\n" content "<|eos|>"; the prompt ends "<|assistant|>\n" and the
# model answers until <|eos|>. No bos here: the tokenizer adds <|bos|> when the rendered
# text is encoded (as for any prompt), so the trained stream and a served chat agree.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_PROMPTS = ["Tell me a fortune.", "Tell me something funny.", "Say something wise.",
                "Give me a quote.", "What is my fortune?", "Tell me a joke.", "Cheer me up."]
CHAT_FRACTION = 0.1
SAMPLE_PROMPT = "Once upon a time"
MAX_WEIGHT_BYTES = 16 * 2**20

PRESETS = {  # model and run sizes; flags given explicitly override these
    # GPU: ~5.8M params (11.2 MiB bf16); 1200 steps x 32 x 256 = 9.8M tokens (~13 epochs of the
    # 0.75M-token train split: data-bound, hence dropout and keeping the best-validation weights).
    # Measured on the H100: 2400 steps overfit after step 1000 (held-out ppl 65.1); 1200 steps,
    # whose cosine schedule ends sooner, reached 60.5.
    "gpu": dict(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=768, vocab=4096,
                steps=1200, batch_size=32, seq_len=256, lr=1e-3, warmup=100, dropout=0.1,
                eval_every=100, eval_tokens=0, max_entries=0),
    # CPU, 2 cores: ~2.3M params; about 12 minutes.
    # CPU, 2 shared cores: ~1.3M params; training stops (and the schedule ends) after --time-limit
    # seconds. Compute-bound, so a small model that sees more tokens wins: hidden 192 reached
    # held-out ppl 145 in the same 11 minutes, this one 110.
    "cpu": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=4096,
                steps=100_000, time_limit=660.0, batch_size=16, seq_len=128, lr=3e-3, warmup=30, dropout=0.0,
                eval_every=100, eval_tokens=16384, max_entries=0),
    # Smoke test: seconds.
    "smoke": dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, vocab=512,
                  steps=20, batch_size=4, seq_len=64, lr=3e-3, warmup=4, dropout=0.0,
                  eval_every=10, eval_tokens=2048, max_entries=1000),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (replaced)")
    p.add_argument("--corpus", type=Path, default=REPO_ROOT / "data" / "fortunes.txt",
                   help="plain text, entries separated by blank lines (tools/fetch_corpus.sh)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default sizes: gpu on CUDA, cpu otherwise, smoke with --smoke")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps (a quick CPU check)")
    p.add_argument("--seed", type=int, default=1234)
    for name, typ in [("steps", int), ("batch-size", int), ("seq-len", int), ("lr", float),
                      ("warmup", int), ("dropout", float), ("eval-every", int), ("eval-tokens", int),
                      ("time-limit", float), ("max-entries", int),
                      ("hidden", int), ("layers", int), ("heads", int), ("kv-heads", int),
                      ("intermediate", int), ("vocab", int)]:
        p.add_argument(f"--{name}", type=typ, default=None, help="overrides the preset")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    p.add_argument("--max-positions", type=int, default=512, help="max_position_embeddings")
    p.add_argument("--save-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile the training step's model (CUDA)")
    args = p.parse_args(argv)
    if args.smoke and args.preset not in (None, "smoke"):
        p.error("--smoke uses the smoke preset")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = "smoke" if args.smoke else (args.preset or ("gpu" if args.device.startswith("cuda") else "cpu"))
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # --time-limit: the run ends after this many training seconds (or --steps, whichever first),
    # the lr schedule following the larger fraction done. Not bit-reproducible: for slow CPUs.
    args.time_limit = args.time_limit or None
    return args


# ---------------------------------------------------------------- data and tokenizer

def split_entries(entries: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, held-out) by entry: a seeded permutation, 90 / 5 / 5."""
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(0.05 * len(entries)))
    heldout = [entries[i] for i in order[:n_eval]]
    val = [entries[i] for i in order[n_eval: 2 * n_eval]]
    train = [entries[i] for i in order[2 * n_eval:]]
    return train, val, heldout


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                 pad_token="<|pad|>", model_max_length=None)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def pack_train(tokenizer, entries: list[str], seed: int) -> tuple[torch.Tensor, int]:
    """The train stream: entries in split order, CHAT_FRACTION of them as a chat answer."""
    rng = random.Random(seed + 1)
    texts, is_chat = [], []
    for entry in entries:
        chat = rng.random() < CHAT_FRACTION
        if chat:
            messages = [{"role": "user", "content": rng.choice(CHAT_PROMPTS)},
                        {"role": "assistant", "content": entry}]
            entry = tokenizer.apply_chat_template(messages, tokenize=False)  # ends with <|eos|>
        texts.append(entry)
        is_chat.append(chat)
    ids = []
    for chat, tokens in zip(is_chat, tokenizer(texts)["input_ids"]):  # <|bos|> first
        ids += tokens if chat else tokens + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long), sum(is_chat)


# ---------------------------------------------------------------- model

def build_model(args, vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=args.max_positions, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    std = 0.02
    for name, param in model.named_parameters():  # GPT-2 style init; residual outputs scaled by depth
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(param, std=std / math.sqrt(2 * args.layers))
        else:
            torch.nn.init.normal_(param, std=std)
    return model


def add_dropout(model: LlamaForCausalLM, p: float) -> list:
    """Dropout on the embeddings and on each attention / MLP output, as forward hooks (training only)."""
    if p <= 0:
        return []
    modules = [model.model.embed_tokens]
    for layer in model.model.layers:
        modules += [layer.self_attn, layer.mlp]
    return [m.register_forward_hook(lambda mod, inp, out: F.dropout(out, p, mod.training)) for m in modules]


def hf_config_dict(model: LlamaForCausalLM, tokenizer, save_dtype: str) -> dict:
    import transformers

    c = model.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"], dtype=save_dtype)
    d = json.loads(config.to_json_string(use_diff=True))  # as save_pretrained writes it
    # Also the transformers-4 spellings, for older readers of the checkpoint.
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], dtype=save_dtype, torch_dtype=save_dtype,
             rope_theta=c.rope_theta, tie_word_embeddings=True)
    return dict(sorted(d.items()))


# ---------------------------------------------------------------- training

def lr_at(step: int, args, progress: float | None = None) -> float:
    """Linear warmup over --warmup steps, then cosine to min_lr_ratio * lr at progress 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = progress if progress is not None else (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def progress_at(step: int, elapsed: float, args) -> float:
    """Fraction of the run done: by steps, or by --time-limit when that comes first."""
    p = step / args.steps
    if args.time_limit:
        p = max(p, elapsed / args.time_limit)
    return min(1.0, p)


def train(args, model, stream: torch.Tensor, val_ids: list[int], device: torch.device) -> dict:
    use_cuda = device.type == "cuda"
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if use_cuda else {}))
    hooks = add_dropout(model, args.dropout)
    step_model = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed + 2)
    stream = stream.to(device)
    n_windows = stream.numel() - args.seq_len - 1
    positions = torch.arange(args.seq_len, device=device).expand(args.batch_size, -1)
    offsets = torch.arange(args.seq_len + 1, device=device)
    val_ids = val_ids[: args.eval_tokens] if args.eval_tokens else val_ids

    history, best = [], {"val_ppl": float("inf"), "step": 0, "state": None}
    tokens_seen, t0, t_log, eval_seconds = 0, time.time(), time.time(), 0.0
    model.train()
    step, last = 0, False
    while not last:
        progress = progress_at(step, time.time() - t0 - eval_seconds, args)
        lr = lr_at(step, args, progress if args.time_limit else None)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n_windows, (args.batch_size,), generator=gen).to(device)
        batch = stream[starts[:, None] + offsets]  # [B, S+1]
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_cuda):
            logits = step_model(x, positions)  # [B, S, V]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += x.numel()
        step += 1
        last = progress_at(step, time.time() - t0 - eval_seconds, args) >= 1.0
        if step % args.log_every == 0 or last:
            if use_cuda:
                torch.cuda.synchronize()
            n = step % args.log_every or args.log_every
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.3f}  lr {lr:.2e}  "
                  f"{n * x.numel() / (time.time() - t_log):,.0f} tok/s  {time.time() - t0:6.0f}s", flush=True)
            t_log = time.time()
        if step % args.eval_every == 0 or last:
            t_eval = time.time()
            model.eval()
            val_ppl, _ = perplexity(model, val_ids, seq_len=args.seq_len, batch_size=32)
            model.train()
            eval_seconds += time.time() - t_eval
            history.append({"step": step, "train_loss": round(loss.item(), 4), "val_ppl": round(val_ppl, 3),
                            "seconds": round(time.time() - t0, 1)})
            print(f"step {step:5d}  validation ppl {val_ppl:.2f}", flush=True)
            if val_ppl < best["val_ppl"]:
                best = {"val_ppl": val_ppl, "step": step,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            t_log = time.time()
    if use_cuda:
        torch.cuda.synchronize()
    wall = time.time() - t0
    for h in hooks:
        h.remove()
    final_loss = loss.item()
    if best["state"] is not None and best["step"] != step:
        print(f"restoring the weights of step {best['step']} (validation ppl {best['val_ppl']:.2f})")
        model.load_state_dict(best["state"])
    model.eval()
    return {"steps_done": step, "tokens_seen": tokens_seen, "train_seconds": round(wall, 1),
            "eval_seconds": round(eval_seconds, 1),
            "tokens_per_second": round(tokens_seen / wall), "final_train_loss": round(final_loss, 4),
            "best_step": best["step"], "best_val_ppl_during_training": round(best["val_ppl"], 3),
            "history": history}


# ---------------------------------------------------------------- saving and checking

def save_checkpoint(out: Path, model, tokenizer, args) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    dtype = getattr(torch, args.save_dtype)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}  # tied: saved once, as HF does
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # package data: readable by all
    (out / "config.json").write_text(json.dumps(hf_config_dict(model, tokenizer, args.save_dtype), indent=2) + "\n")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(out))

    tokenizer.save_pretrained(str(out), save_jinja_files=False)  # the chat template in tokenizer_config.json
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
               bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", add_bos_token=True,
               add_eos_token=False, clean_up_tokenization_spaces=False)
    cfg.pop("model_max_length", None)
    cfg_file.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
         "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]}, indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_WEIGHT_BYTES:
        raise SystemExit(f"model.safetensors is {size / 2**20:.1f} MiB, over the {MAX_WEIGHT_BYTES >> 20} MiB limit")


def check_checkpoint(out: Path, model, tokenizer, args) -> dict:
    """Reload the directory as a user would and compare with the in-memory model."""
    from transformers import AutoTokenizer

    import trtllm

    tok2 = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    probe = "Once upon a time, a penguin said: \"Don't panic!\"\n-- Douglas Adams"
    assert tok2(probe)["input_ids"] == tokenizer(probe)["input_ids"], "reloaded tokenizer encodes differently"
    assert tok2.decode(tok2(probe)["input_ids"], skip_special_tokens=True) == probe, "tokenizer round trip"
    assert tok2.chat_template == CHAT_TEMPLATE

    loaded = trtllm.load_model(out, dtype=torch.float32, device="cpu")
    ref = copy.deepcopy(model).to("cpu")
    with torch.no_grad():  # the in-memory model with the weights rounded as saved
        for p in ref.parameters():
            p.copy_(p.to(getattr(torch, args.save_dtype)).float())
    ids = torch.tensor([tokenizer(probe)["input_ids"]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        a, b = ref.float()(ids, pos), loaded(ids, pos)
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"reloaded logits differ from the in-memory model's by {diff}"
    checks = {"trtllm_load_model_max_abs_logit_diff": diff}
    try:  # transformers' own Llama reads the same directory
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            c = hf(ids).logits
        hf_diff = (c - b).abs().max().item()
        assert hf_diff < 1e-3, f"transformers' LlamaForCausalLM gives logits differing by {hf_diff}"
        checks["transformers_max_abs_logit_diff"] = hf_diff
    except ImportError as e:  # pragma: no cover
        checks["transformers_check"] = f"skipped: {e}"
    print(f"checkpoint reloads: max |logit diff| trtllm {diff:.2e}, "
          f"transformers {checks.get('transformers_max_abs_logit_diff', float('nan')):.2e}")
    return checks


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, n: int, seed: int, temperature=0.8, top_k=40) -> str:
    """A seeded sampled continuation (for the docs: greedy decoding of tiny models loops)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    start = ids.shape[1]
    for _ in range(n):
        logits = model(ids, torch.arange(ids.shape[1], device=device)[None])[0, -1].float().cpu() / temperature
        kth = logits.topk(top_k).values[-1]
        probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        if nxt.item() == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, nxt.to(device).view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, start:].tolist(), skip_special_tokens=True)


def versions() -> dict:
    import safetensors
    import tokenizers
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # No TF32: evaluations are fp32 (training itself runs under bf16 autocast on CUDA).
    torch.backends.cuda.matmul.allow_tf32 = False

    if not args.corpus.is_file():
        raise SystemExit(f"corpus {args.corpus} not found: run tools/fetch_corpus.sh first")
    entries = read_entries(args.corpus)
    if args.max_entries:
        entries = entries[: args.max_entries]
    train_entries, val_entries, heldout_entries = split_entries(entries, args.seed)
    print(f"corpus {args.corpus}: {len(entries)} entries -> train {len(train_entries)}, "
          f"validation {len(val_entries)}, held-out {len(heldout_entries)}")

    tokenizer = train_tokenizer(train_entries, args.vocab)
    vocab_size = 64 * math.ceil(len(tokenizer) / 64)
    stream, n_chat = pack_train(tokenizer, train_entries, args.seed)
    val_ids, heldout_ids = pack(tokenizer, val_entries), pack(tokenizer, heldout_entries)
    print(f"tokenizer: {len(tokenizer)} tokens (model vocab {vocab_size}); train stream {stream.numel():,} tokens "
          f"({n_chat} entries as chat), validation {len(val_ids):,}, held-out {len(heldout_ids):,}")

    model = build_model(args, vocab_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_params * 2 / 2**20:.1f} MiB in 16 bits), "
          f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
          f"intermediate {args.intermediate}; {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"= {args.steps * args.batch_size * args.seq_len / stream.numel():.1f} epochs"
          f"{f' or {args.time_limit:.0f}s' if args.time_limit else ''}; device {device}")

    stats = train(args, model, stream, val_ids, device)

    out = args.out.resolve()
    save_checkpoint(out, model, tokenizer, args)
    # The small held-out file the tests re-measure: whole held-out entries, about 4 KB.
    sample_entries, size = [], 0
    for e in heldout_entries:
        if size and size + len(e) > 4096:
            break
        sample_entries.append(e)
        size += len(e) + 2
    (out / HELDOUT_SAMPLE).write_text("\n\n".join(sample_entries) + "\n", encoding="utf-8")
    checks = check_checkpoint(out, model, tokenizer, args)

    # Final numbers on the weights as saved (reloaded, fp32).
    import trtllm

    saved = trtllm.load_model(out, dtype=torch.float32, device=device)
    heldout_ppl, heldout_n = perplexity(saved, heldout_ids, seq_len=args.seq_len)
    val_ppl, _ = perplexity(saved, val_ids, seq_len=args.seq_len)
    sample_ids = pack(tokenizer, read_entries(out / HELDOUT_SAMPLE))
    sample_ppl, sample_n = perplexity(saved, sample_ids, seq_len=args.seq_len)
    cpu_model = trtllm.load_model(out, dtype=torch.float32, device="cpu")
    cpu_sample_ppl, _ = perplexity(cpu_model, sample_ids, seq_len=args.seq_len)  # what the CPU test recomputes
    greedy = greedy_generate(cpu_model, tokenizer, SAMPLE_PROMPT, max_new_tokens=40)
    sampled = sample_text(cpu_model, tokenizer, SAMPLE_PROMPT, 60, seed=args.seed)
    chat_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a fortune."}],
                                                tokenize=False, add_generation_prompt=True)
    chat = greedy_generate(cpu_model, tokenizer, chat_prompt, max_new_tokens=60)
    print(f"held-out perplexity {heldout_ppl:.2f} ({heldout_n:,} tokens); validation {val_ppl:.2f}; "
          f"{HELDOUT_SAMPLE} {sample_ppl:.2f} ({sample_n} tokens)")
    print(f"greedy  {SAMPLE_PROMPT!r} -> {greedy!r}")
    print(f"sampled {SAMPLE_PROMPT!r} -> {sampled!r}")
    print(f"chat    'Tell me a fortune.' -> {chat!r}")

    corpus_info = {}
    info_file = args.corpus.parent / "corpus.json"
    if info_file.is_file():
        corpus_info = json.loads(info_file.read_text())
    import hashlib

    corpus_info.update(
        corpus_file=args.corpus.name,
        corpus_sha256=hashlib.sha256(args.corpus.read_bytes()).hexdigest(),
        split={"seed": args.seed, "train_entries": len(train_entries), "validation_entries": len(val_entries),
               "heldout_entries": len(heldout_entries), "rule": "seeded permutation of entries, 90/5/5"},
        tokens={"train": stream.numel(), "validation": len(val_ids), "heldout": len(heldout_ids)})
    (out / "corpus.json").write_text(json.dumps(corpus_info, indent=2) + "\n")

    n_embed = model.model.embed_tokens.weight.numel()
    record = {
        "seed": args.seed,
        "preset": args.preset,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "command": " ".join([Path(sys.argv[0]).name if argv is None else "train_demo_model.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "model": {"parameters": n_params, "non_embedding_parameters": n_params - n_embed,
                  "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                  "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
                  "intermediate_size": args.intermediate, "vocab_size": vocab_size,
                  "max_position_embeddings": args.max_positions, "saved_dtype": args.save_dtype,
                  "weights_bytes": (out / "model.safetensors").stat().st_size},
        "training": {"steps": stats["steps_done"], "max_steps": args.steps, "time_limit_s": args.time_limit,
                     "max_entries": args.max_entries or None, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                     "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
                     "dropout": args.dropout, "optimizer": "AdamW(0.9, 0.95), cosine, grad clip 1.0",
                     "autocast": "bfloat16" if device.type == "cuda" else "none (fp32)",
                     "epochs": round(stats["tokens_seen"] / stream.numel(), 2), **stats},
        "train_loss": stats["final_train_loss"],
        "tokens_seen": stats["tokens_seen"],
        "wall_seconds": None,  # filled below
        "heldout_perplexity": round(heldout_ppl, 4),
        "heldout_tokens": heldout_n,
        "validation_perplexity": round(val_ppl, 4),
        "heldout_sample": {"file": HELDOUT_SAMPLE, "perplexity": round(sample_ppl, 4),
                           "perplexity_cpu_fp32": round(cpu_sample_ppl, 4), "tokens": sample_n,
                           "seq_len": args.seq_len},
        "perplexity_method": "token-level exp(mean NLL) over the packed stream (<|bos|> entry <|eos|> ...), "
                             "windows of seq_len+1 overlapping by one, fp32, the saved weights",
        "samples": {"prompt": SAMPLE_PROMPT, "greedy_40_tokens": greedy,
                    "sampled_60_tokens": {"text": sampled, "temperature": 0.8, "top_k": 40, "seed": args.seed},
                    "chat_greedy": {"user": "Tell me a fortune.", "assistant": chat}},
        "checks": checks,
        "versions": versions(),
    }
    record["wall_seconds"] = round(time.time() - t_start, 1)
    (out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB) "
          f"in {record['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()

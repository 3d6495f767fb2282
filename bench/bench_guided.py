"""Structured output: guided JSON throughput against unguided, same engine, same run; and the
grammar compilation of a typical tool schema.

    PYTHONPATH=$PWD python bench/bench_guided.py [--smoke] [--batch 64] [--new 128]

Llama-3-8B shapes (bench_e2e.py's, random bf16 weights; --smoke: tiny shapes in fp32, runs on
CPU), a byte-level BPE tokenizer of the model's vocabulary size built here (Llama-3's is not on
the machine: its tokens are synthetic, English-like words and pieces with and without a
leading space, digits, punctuation, multi-byte characters, so the per-token mask work is of
the same kind, not Llama-3's exact figure). `--batch` requests of 128 prompt tokens, greedy:

- correctness first: a batch guided by the tool schema (TOOL_SCHEMA) whose every output must
  end ("stop") and validate against it;
- unguided: `max_tokens=--new`, ignore_eos (the engine's fast path: the decode graph's own
  argmax and the overlap scheduler);
- guided JSON: the same requests constrained by a JSON array of tool-call objects of at
  least --new items (`long_schema`: each item takes at least one token, so the array cannot
  close early), so every request runs all --new tokens inside JSON (strings, numbers, enums,
  keys) and the two runs generate the same token count;
- compilation: the tokenizer info (once per engine), the tool schema's first compilation,
  a second distinct schema's, and the cached lookup.

Throughput = generated tokens / wall time of `LLM.generate` (after a warm-up run of each
kind). Greedy guided requests keep the unguided fast path (runtime/grammar.py `mask_picks`:
the decode graph's picks re-made under the grammar's mask on the device, steps still
launched ahead), so what the guided row pays is the host's bitmask filling (xgrammar's
multi-threaded fill, during the GPU's step; given per step), the mask's copy and masked
argmax, and the matchers' bookkeeping. Table last; JSON under $OUT when set.
"""
import argparse
import json
import random
import time

import torch

from bench.bench_e2e import LLAMA3_8B, SMOKE, build_models
from bench.report import markdown, report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import GuidedDecodingParams, SamplingParams

PROMPT = 128
TOOL_SCHEMA = {  # a typical function-calling schema: enums, bounded strings, numbers, a nested array
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather", "search_flights", "book_hotel"]},
        "arguments": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "date": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"},
            "guests": {"type": "integer", "minimum": 1, "maximum": 8},
            "budget": {"type": "integer", "minimum": 0, "maximum": 100000},
            "flexible": {"type": "boolean"},
            "amenities": {"type": "array", "items": {"enum": ["wifi", "pool", "gym", "parking"]}, "maxItems": 4}},
            "required": ["city", "date", "guests", "flexible", "amenities"]}},
    "required": ["name", "arguments"]}
def long_schema(min_items: int) -> dict:
    """An array of tool calls that no output of fewer than `min_items` tokens can close (with
    minItems 1, a random model's greedy JSON closed it early and its request stopped)."""
    return {"type": "array", "items": TOOL_SCHEMA, "minItems": min_items}


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 style) with `vocab_size` tokens: the 256
    bytes, then distinct synthetic pieces, then "<|eot_id|>" (the EOS) last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(seed)
    encode = _byte_level_encoder()
    vocab = {encode(bytes([b])): b for b in range(256)}
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
               1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    pieces = ["{", "}", "[", "]", "\":", "\",", "\"", ", ", ": ", "()", "->", "==", "\n", "\n\n", "  ", "    ",
              "é", "ü", "中", "の", "😀", "—", "’"]
    while len(vocab) < vocab_size - 1:
        kind = rng.random()
        if kind < 0.8:
            word = "".join(rng.choices(letters, weights, k=rng.randint(2, 9)))
            word = word.capitalize() if rng.random() < 0.15 else word
            text = (" " + word) if rng.random() < 0.6 else word
        elif kind < 0.9:
            text = str(rng.randint(0, 999))
        else:
            text = "".join(rng.choices(pieces, k=rng.randint(1, 3)))
        vocab.setdefault(encode(text.encode()), len(vocab))
    vocab["<|eot_id|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot_id|>")


def _byte_level_encoder():
    """bytes -> GPT-2's byte-level string (each byte one printable character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    return lambda data: "".join(table[b] for b in data)


def timed_generate(llm, prompts, params):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 (runs on CPU in a minute)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    import jsonschema
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SMOKE if args.smoke else LLAMA3_8B
    vocab = shape["vocab_size"]
    t0 = time.perf_counter()
    tokenizer = synthetic_tokenizer(vocab)
    tokenizer_s = time.perf_counter() - t0
    _, model = build_models(shape, device=device)
    if args.smoke:
        model = model.float()
    llm = LLM(model, tokenizer=tokenizer, dtype="float32" if args.smoke else "auto",
              build_config=BuildConfig(max_batch_size=max(args.batch, 8), max_num_tokens=8192,
                                       max_seq_len=PROMPT + args.new + 512),
              kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.85) if device == "cuda"
              else KvCacheConfig(max_tokens=args.batch * (PROMPT + args.new + 512)))
    hooks = llm.engine.logits_hooks
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab - 1, (PROMPT,), generator=rng).tolist() for _ in range(args.batch)]
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": args.batch,
               "new_tokens": args.new, "vocab": vocab, "synthetic_tokenizer_s": tokenizer_s}

    # -- compilation: tokenizer info once, then per schema; cached after ---------------------------
    from trtllm.runtime import guides
    t0 = time.perf_counter()
    hooks._grammar_compiler()
    results["tokenizer_info_ms"] = (time.perf_counter() - t0) * 1e3
    for name, schema in (("tool_schema", TOOL_SCHEMA), ("long_schema", long_schema(args.new))):
        t0 = time.perf_counter()
        hooks.compile(GuidedDecodingParams(json=schema))
        results[f"compile_{name}_ms"] = (time.perf_counter() - t0) * 1e3
    guides._parsed.clear()  # the cached path: the engine's compiled dict alone
    t0 = time.perf_counter()
    hooks.compile(GuidedDecodingParams(json=TOOL_SCHEMA))
    results["compile_cached_ms"] = (time.perf_counter() - t0) * 1e3

    # -- correctness: the tool schema's outputs end and validate -----------------------------------
    check = SamplingParams(max_tokens=512, temperature=0.0, guided_decoding=GuidedDecodingParams(json=TOOL_SCHEMA))
    outs = llm.generate(prompts[:16], check, use_tqdm=False)
    bad = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason != "stop"]
    for o in outs:
        if o.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(o.outputs[0].text), TOOL_SCHEMA)
    assert not bad, f"{len(bad)} tool-schema outputs did not end within 512 tokens: {bad[0][:200]!r}"
    results["tool_schema_outputs_valid"] = len(outs)
    print(f"correctness: {len(outs)} tool-schema outputs parse and validate", flush=True)

    # -- throughput: unguided vs guided JSON, same requests, same token count ----------------------
    plain = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True,
                            guided_decoding=GuidedDecodingParams(json=long_schema(args.new)))
    rows = []
    for label, params in (("unguided (greedy)", plain), ("guided JSON (greedy)", guided)):
        timed_generate(llm, prompts, params)  # warm-up: graphs, compilation, caches
        fill0 = hooks.fill_s
        outs, wall = timed_generate(llm, prompts, params)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        assert all(o.outputs[0].finish_reason == "length" for o in outs), "a request ended early"
        key = "guided" if params.guided_decoding is not None else "unguided"
        results[f"{key}_tok_s"] = tokens / wall
        results[f"{key}_wall_s"] = wall
        if key == "guided":
            results["bitmask_fill_ms_per_step"] = (hooks.fill_s - fill0) / args.new * 1e3
            for o in outs[:4]:  # cut at --new tokens: a prefix of a valid JSON array, never anything else
                assert o.outputs[0].text.startswith("["), o.outputs[0].text[:80]
        rows.append({"run": label, "batch": args.batch, "tokens": tokens, "wall s": f"{wall:.2f}",
                     "tok/s": f"{tokens / wall:,.0f}"})
        print(rows[-1], flush=True)
    ratio = results["guided_tok_s"] / results["unguided_tok_s"]
    results["guided_over_unguided"] = ratio
    rows.append({"run": "guided / unguided", "batch": args.batch, "tokens": "", "wall s": "",
                 "tok/s": f"{ratio:.3f}x"})
    table = markdown(rows) + "\n" + markdown([
        {"grammar work": "tokenizer info (once per engine)", "ms": f"{results['tokenizer_info_ms']:.1f}"},
        {"grammar work": "compile the tool schema (first time)", "ms": f"{results['compile_tool_schema_ms']:.1f}"},
        {"grammar work": "compile the long schema (first time)", "ms": f"{results['compile_long_schema_ms']:.1f}"},
        {"grammar work": "the tool schema again (cached)", "ms": f"{results['compile_cached_ms']:.3f}"},
        {"grammar work": f"bitmask fill per step, batch {args.batch} (host, during the GPU's step)",
         "ms": f"{results['bitmask_fill_ms_per_step']:.3f}"},
    ])
    report("bench_guided", f"# guided decoding, {results['device']}, vocab {vocab}\n" + table, results)
    llm.shutdown()


if __name__ == "__main__":
    main()

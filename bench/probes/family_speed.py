"""Does a non-Llama family decode as fast through our model file as through the HF module,
and as close to the weight-bandwidth ceiling as the Llama path? Gemma-3-1B shapes (random
bf16 weights) through models/gemma.py ("own") and transformers' Gemma3ForCausalLM ("hf"),
and the llama-3.2-1b preset ("llama"): batch 1 and 64, 128-token prompts, 128 tokens greedy,
through LLM.generate. One path per process (`family_speed.py own`), as each holds the GPU.
SMALL=1 runs tiny shapes on CPU (a smoke test of the script). Answer in docs/models.md."""
import json
import os
import sys
import time

import torch
import transformers

from trtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams
from trtllm.cli.model_arg import PRESETS, build_preset
from trtllm.models.gemma import GemmaConfig, GemmaForCausalLM

OUT = os.environ.get("OUT", "/tmp")
SMALL = os.environ.get("SMALL") == "1"
DEV = "cpu" if SMALL else "cuda"
cfg = transformers.Gemma3TextConfig(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                    sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32768,
                                    rope_local_base_freq=10000.0, rope_theta=1000000.0)
if SMALL:
    cfg = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=32, vocab_size=512, sliding_window=16,
                                        query_pre_attn_scalar=32, max_position_embeddings=1024)

def sync():
    if not SMALL:
        torch.cuda.synchronize()


def randomize(model):
    g = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05 if p.dim() == 1 else p.shape[-1] ** -0.5, generator=g)
    return model.eval().requires_grad_(False)

def hf_module():
    m = transformers.Gemma3ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager")
    return randomize(m.to(DEV))

def own_module():
    with torch.device("meta"):
        m = GemmaForCausalLM(GemmaConfig.from_hf(cfg)).to(torch.bfloat16)
    m.to_empty(device=DEV)
    m.tie_weights()
    randomize(m)
    m.init_buffers(DEV)
    return m

def nbytes(m):
    seen, n = set(), 0
    for p in m.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n

BUILDERS = {"own": lambda: own_module(), "hf": lambda: hf_module(),
            "llama": lambda: build_preset(dict(PRESETS["tiny-llama" if SMALL else "llama-3.2-1b"]), "bfloat16", DEV)}


def main():
    rows = []
    which = sys.argv[1:] or ["own", "hf", "llama"]
    for name in which:
        t0 = time.perf_counter()
        module = BUILDERS[name]()
        weights = nbytes(module)
        llm = LLM(module, build_config=BuildConfig(max_batch_size=64, max_num_tokens=8192, max_seq_len=512),
                  kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5))
        startup = time.perf_counter() - t0
        with llm:
            vocab = 200
            params = SamplingParams(max_tokens=4 if SMALL else 128, temperature=0.0, ignore_eos=True)
            res = {"path": name, "summary_model": llm.compiled.summary().splitlines()[0], "weights_GB": weights / 1e9,
                   "startup_s": startup}
            for b in ((1, 2) if SMALL else (1, 64)):
                prompts = [[(7 * i + j) % vocab + 3 for j in range(8 if SMALL else 128)] for i in range(b)]
                llm.generate(prompts, params, use_tqdm=False)  # warm
                sync()
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                sync()
                dt = time.perf_counter() - t
                n = sum(len(o.outputs[0].token_ids) for o in outs)
                res[f"b{64 if b > 1 else 1}_tok_s"] = n / dt
            res["b1_ceiling_tok_s"] = 4.3e12 / weights
            res["b1_frac_of_ceiling"] = res["b1_tok_s"] / res["b1_ceiling_tok_s"]
        rows.append(res)
        print(json.dumps(res), flush=True)
        del llm, module
        torch.cuda.empty_cache()
    json.dump(rows, open(f"{OUT}/gemma_perf.json", "w"), indent=1)
    print(f"{'path':8} {'weights GB':>10} {'startup s':>9} {'b1 tok/s':>9} {'ceiling':>8} {'frac':>5} {'b64 tok/s':>9}")
    for r in rows:
        print(f"{r['path']:8} {r['weights_GB']:10.2f} {r['startup_s']:9.1f} {r['b1_tok_s']:9.0f} {r['b1_ceiling_tok_s']:8.0f} {r['b1_frac_of_ceiling']:5.2f} {r['b64_tok_s']:9.0f}")


if __name__ == "__main__":
    main()

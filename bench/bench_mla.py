"""DeepSeek-V2-Lite shapes (multi-head latent attention + 64 experts): the MLA decode kernel,
then decode end to end, each beside its bandwidth ceiling.

    PYTHONPATH=$PWD python3 bench/bench_mla.py            # H100/H200
    PYTHONPATH=$PWD python3 bench/bench_mla.py --smoke    # CPU: interpreter, tiny shapes

1. Correctness first (exit 1 before anything is timed): `trtllm.mla_decode` (Triton) against
   `mla_decode_ref` at V2-Lite's latent geometry (16 heads, kv_lora_rank 512, rope 64), and the
   LLM's compiled model (the `deepseek-v2-lite` preset of trtllm-bench: transformers' module,
   random bf16 weights) against the eager module on one whole prompt (in bf16: each against an
   fp32 copy of the module, ours no further from it than eager bf16).
2. The decode kernel alone (one layer, context CONTEXT, batch 1 and 64, a CUDA graph of the
   op): GB/s of latent rows read ((512 + 64) x 2 bytes per token) beside the 1 GiB copy's.
3. End to end: `LLM` on the preset, prompts of PROMPT random tokens, NEW greedy tokens
   (ignore_eos), batch 1 and batch 64 submitted at once; output tok/s = B * NEW / wall, after
   one warm-up run of the same shape. ceiling tok/s = copy B/s / bytes one decode step reads
   x B, where a step reads every weight but the embedding table and the routed experts no
   token chose: at batch B, E (1 - (1 - k / E)^B) distinct experts per MoE layer expected
   under uniform routing (6 of 64 at batch 1, ~all 64 at batch 64); KV rows not counted.
Table last, also written to $OUT/bench_mla.{md,json} (bench/report.py).
--smoke: CPU, TRITON_INTERPRET=1 for step 1's kernel check, the `tiny-deepseek-v2` preset in
fp32, steps 2 skipped and step 3 run once with few tokens (figures of no meaning).
"""
import copy
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: @triton.jit reads it when a kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from bench.report import copy_ceiling_tbs, markdown, report  # noqa: E402
from tests.kernels.test_mla_decode import make_case  # noqa: E402
from trtllm.cli.model_arg import resolve_model  # noqa: E402
from trtllm.config import BuildConfig, KvCacheConfig  # noqa: E402
from trtllm.kernels.mla_decode import mla_decode, mla_decode_ref  # noqa: E402
from trtllm.runtime.llm import LLM  # noqa: E402
from trtllm.sampling_params import SamplingParams  # noqa: E402

PRESET = "tiny-deepseek-v2" if SMOKE else "deepseek-v2-lite"
DEVICE, DTYPE = ("cpu", torch.float32) if SMOKE else ("cuda", torch.bfloat16)
HEADS, RANK, ROPE = (4, 32, 8) if SMOKE else (16, 512, 64)
CONTEXT = 40 if SMOKE else 2048
BATCHES = (1, 3) if SMOKE else (1, 64)
PROMPT, NEW = (8, 4) if SMOKE else (128, 128)
MAX_REL_ERR = 2e-2


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_kernel() -> float:
    case = make_case([CONTEXT, 7, CONTEXT // 3 + 1], HEADS, RANK, ROPE, DTYPE)
    case = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in case]
    ref_case = [t.clone() if isinstance(t, torch.Tensor) else t for t in case]
    scale = (128 + 64) ** -0.5
    out = mla_decode(*case, scale, 3, CONTEXT)
    return rel_err(out, mla_decode_ref(*ref_case, scale, 3, CONTEXT))


def time_kernel(batch: int) -> dict:
    """us per call of the op in a CUDA graph (replays timed), and the latent rows' GB/s."""
    from triton.testing import do_bench_cudagraph
    case = make_case([CONTEXT] * batch, HEADS, RANK, ROPE, DTYPE, block_size=16, layers=1, layer=0)
    case = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in case]
    ms = do_bench_cudagraph(lambda: mla_decode(*case, 0.1, batch, CONTEXT))
    read = batch * CONTEXT * (RANK + ROPE) * case[0].element_size()
    return dict(us=round(ms * 1e3, 2), gbs=round(read / ms / 1e6, 1))


def step_bytes(model, batch: int) -> float:
    """Bytes of weights one decode step of `batch` tokens reads (module docstring)."""
    total = expert = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
        if ".mlp.experts." in name:
            expert += p.numel() * p.element_size()
    config = model.config
    E, k = config.n_routed_experts, config.num_experts_per_tok
    chosen = E * (1 - (1 - k / E) ** batch)
    return total - expert + expert * chosen / E


def run_llm(llm, batch: int, vocab: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (batch, PROMPT), generator=g).tolist()
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == NEW for o in outs)
    return batch * NEW / wall


def main():
    rows, record = [], {"preset": PRESET, "smoke": SMOKE}
    err = check_kernel()
    print(f"mla_decode vs reference: rel err {err:.2e}")
    if err > MAX_REL_ERR:
        sys.exit(f"mla_decode differs from its reference ({err:.2e} > {MAX_REL_ERR})")
    spec = resolve_model(PRESET)
    kwargs = spec.llm_kwargs(dtype="float32" if SMOKE else "bfloat16", device=DEVICE)
    model = kwargs["model"]
    with torch.no_grad():  # the eager module, before LLM wraps and compiles it
        ids = torch.randint(0, spec.vocab_size, (1, 24), device=DEVICE)
        eager = model(input_ids=ids, position_ids=torch.arange(24, device=DEVICE)[None]).logits
        exact = None
        if DTYPE != torch.float32:  # and an fp32 copy's (63 GB for V2-Lite), freed before the LLM sizes its pool
            copy32 = copy.deepcopy(model).float()
            exact = copy32(input_ids=ids, position_ids=torch.arange(24, device=DEVICE)[None]).logits.float()
            del copy32
            torch.cuda.empty_cache()
    llm = LLM(**kwargs, kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=None if not SMOKE else 2048),
              build_config=BuildConfig(max_batch_size=max(BATCHES), max_num_tokens=max(BATCHES) * PROMPT,
                                       max_seq_len=PROMPT + NEW + 16))
    compiled = llm.compiled(ids, torch.arange(24, device=DEVICE)[None])
    err_model = rel_err(compiled, eager)
    print(f"compiled model vs eager HF module: rel err {err_model:.2e}")
    if exact is None and err_model > MAX_REL_ERR:
        sys.exit(f"the compiled model differs from the eager module ({err_model:.2e} > {MAX_REL_ERR})")
    if exact is not None:  # two bf16 computations part by their roundings (3.1e-2 on the H200, 2026-12-03):
        # each against the fp32 copy, ours no further from it than eager bf16 is
        err_ours, err_eager = rel_err(compiled, exact), rel_err(eager, exact)
        print(f"vs fp32: compiled {err_ours:.2e}, eager bf16 {err_eager:.2e}")
        record.update(vs_fp32_rel_err={"compiled": err_ours, "eager_bf16": err_eager})
        if err_ours > 1.5 * err_eager + 1e-3:
            sys.exit(f"the compiled model is further from fp32 than eager bf16 ({err_ours:.2e} vs {err_eager:.2e})")
    print(llm.compiled.summary())
    copy_tbs = None if SMOKE else copy_ceiling_tbs()
    record.update(kernel_rel_err=err, model_rel_err=err_model, copy_tbs=copy_tbs)
    for batch in BATCHES:
        kernel = {} if SMOKE else time_kernel(batch)
        if not SMOKE:
            run_llm(llm, batch, spec.vocab_size, seed=1)  # warm-up of the same shapes
        tok_s = run_llm(llm, batch, spec.vocab_size, seed=2)
        bytes_step = step_bytes(model, batch)
        ceiling = None if copy_tbs is None else copy_tbs * 1e12 / bytes_step * batch
        rows.append({"batch": batch, "decode tok/s": round(tok_s, 1),
                     "weight ceiling tok/s": "-" if ceiling is None else round(ceiling, 1),
                     "of ceiling": "-" if ceiling is None else f"{tok_s / ceiling:.0%}",
                     "GB read / step": round(bytes_step / 1e9, 2),
                     "mla_decode us (1 layer)": kernel.get("us", "-"), "mla_decode GB/s": kernel.get("gbs", "-"),
                     "copy GB/s": "-" if copy_tbs is None else round(copy_tbs * 1e3, 1)})
    llm.shutdown()
    record["rows"] = rows
    title = f"bench_mla: {PRESET}, {PROMPT}/{NEW}, context {CONTEXT} for the kernel" + (" (smoke: CPU)" if SMOKE else "")
    report("bench_mla", title + "\n" + markdown(rows), record)


if __name__ == "__main__":
    main()

"""What does an FP8 (e4m3) or INT8 KV cache cost or save the paged attention kernels, against
the bf16 cache? Half the bytes a token to read, but the tiles are converted to fp16 before
the tensor-core dots (kernels/paged_attention/kv_quant.py; tools/check_kv_quant_build.py
prints the SASS per K/V tile: the decode loop's instructions grow where its bytes halve).
Decode per layer (graphed, 8 layers, read flush, as bench_attention's decode rows) with the
GB/s of cache bytes read, and prefill, at bench_attention's shapes (bf16 q, Hq 32, Hkv 8,
D 128, page 16). Every case is first checked against `paged_attention_ref`.

    PYTHONPATH=$PWD python bench/probes/kv_quant_cost.py
"""
import torch

import trtllm.kernels.paged_attention as pa
from bench.bench_attention import REL_TOL, graphed_layers, make_inputs, ms, ms_read_flush, rel_error
from bench.report import report
from trtllm.kernels.paged_attention.kv_quant import KV_CACHE_DTYPES, KV_QMAX, quantize_kv_ref

LAYERS = 8
FORMATS = ("bf16", "fp8", "int8")


def with_cache(args, fmt):
    """args (bf16 caches) with the caches quantized per layer and kv head at amax / qmax."""
    if fmt == "bf16":
        return list(args)
    a = list(args)
    k_cache, v_cache = a[3], a[4]
    layers, hkv = k_cache.shape[0], k_cache.shape[3]
    scales = torch.empty((layers, 2, hkv), dtype=torch.float32, device=k_cache.device)
    for i, cache in enumerate((k_cache, v_cache)):
        scales[:, i] = cache.float().abs().amax(dim=(1, 2, 4)) / KV_QMAX[fmt]
        stored = torch.empty(cache.shape, dtype=KV_CACHE_DTYPES[fmt], device=cache.device)
        for layer in range(layers):
            stored[layer] = quantize_kv_ref(cache[layer], scales[layer, i], fmt)
        a[3 + i] = stored
    return a + [scales]


def main():
    rows = []
    for batch, ctx in ((1, 2048), (1, 8192), (8, 2048), (64, 2048)):
        base = make_inputs([(ctx - 1, 1)] * batch, seed=batch * 7 + ctx, layers=LAYERS)
        for fmt in FORMATS:
            args = with_cache(base, fmt)
            err = rel_error(args)
            assert err < REL_TOL, (batch, ctx, fmt, err)
            us = ms_read_flush(graphed_layers(args, LAYERS), reps=50) / LAYERS * 1e3
            nbytes = batch * ctx * args[3].shape[3] * args[3].shape[4] * 2 * args[3].element_size()
            rows.append(dict(case=f"decode b{batch} x {ctx}", cache=fmt, us=us, gbs=nbytes / us / 1e3, rel_err=err))
    for tokens in (1024, 4096):
        base = make_inputs([(0, tokens)], seed=tokens)
        for fmt in FORMATS:
            args = with_cache(base, fmt)
            err = rel_error(args)
            assert err < REL_TOL, (tokens, fmt, err)
            us = ms(lambda a=args: pa.paged_attention(*a)) * 1e3
            rows.append(dict(case=f"prefill {tokens}", cache=fmt, us=us, gbs=None, rel_err=err))
    lines = ["| case | cache | us per layer / call | GB/s of cache read | vs bf16 |", "|---|---|---:|---:|---:|"]
    bf16 = {r["case"]: r["us"] for r in rows if r["cache"] == "bf16"}
    for r in rows:
        gbs = f"{r['gbs']:.0f}" if r["gbs"] is not None else ""
        lines.append(f"| {r['case']} | {r['cache']} | {r['us']:.2f} | {gbs} | {r['us'] / bf16[r['case']]:.3f} |")
    report("kv_quant_cost", f"{torch.cuda.get_device_name()}\n" + "\n".join(lines), {"rows": rows})


if __name__ == "__main__":
    main()

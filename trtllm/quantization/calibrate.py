"""Static activation scales by calibration: what trtllm-build --activation_scheme static runs.

    amax = input_amax(model, [token_ids, ...])      # {linear path: largest |input|}, fp32
    set_input_scales(fp8_linears, amax)              # input_scale = amax / 448, per linear

`input_amax` runs the unquantized model eagerly (its own forward, `model(ids, positions)`),
one whole sequence at a time, with a forward pre-hook on each linear `quantizable_linears`
names, before quantize_model replaces their weights: so the scales are those of the
unquantized model's activations, as ModelOpt's and llm-compressor's FP8 calibration take
them. Values past what calibration saw clamp to +-448 at run time.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from trtllm.kernels.fp8_gemm import FP8_MAX
from trtllm.quantization.fp8_linears import MIN_AMAX, Fp8Linears, quantizable_linears


@torch.no_grad()
def input_amax(model: nn.Module, prompts: Sequence[Sequence[int]], progress: bool = False) -> dict[str, torch.Tensor]:
    """{module path: the largest |x| fed to that linear over `prompts`} (fp32 0-d, on the CPU)."""
    prompts = [list(p) for p in prompts if len(p)]
    if not prompts:
        raise ValueError("activation calibration needs at least one non-empty prompt")
    device = next(model.parameters()).device
    amax: dict[str, torch.Tensor] = {}

    def hook(path):
        def record(module, args):
            seen = args[0].detach().abs().amax().float()
            amax[path] = seen if path not in amax else torch.maximum(amax[path], seen)
        return record

    paths = quantizable_linears(model)
    hooks = [model.get_submodule(p).register_forward_pre_hook(hook(p)) for p in paths]
    try:
        from tqdm.auto import tqdm
        for ids in tqdm(prompts, desc="calibrating activation scales", unit="sample", disable=not progress):
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            model(tokens, torch.arange(len(ids), device=device)[None])
    finally:
        for h in hooks:
            h.remove()
    missing = [p for p in paths if p not in amax]
    if missing:
        raise ValueError(f"activation calibration: linears the model never called: {missing}")
    out = {p: a.cpu() for p, a in amax.items()}
    bad = [p for p, a in out.items() if not torch.isfinite(a)]
    if bad:
        raise ValueError(f"activation calibration: non-finite inputs to {bad}")
    return out


def set_input_scales(linears: Fp8Linears, amax: dict[str, torch.Tensor]) -> None:
    """Each linear's static input_scale [1] = amax / 448 (a zero input still gets a positive scale)."""
    for path, q in linears.linears.items():
        if path not in amax:
            raise ValueError(f"activation calibration: no amax for {path}")
        if q.block:
            raise ValueError(f"{path}: static input scales with 128x128 block weights are not supported")
        q.input_scale = (amax[path].clamp(min=MIN_AMAX) / FP8_MAX).reshape(1).float().to(q.weight.device)

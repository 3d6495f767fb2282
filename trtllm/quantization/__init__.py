"""Quantization: the description of a quantized model (which linears are FP8, their scales)
and where it comes from: online quantization of a bf16/fp16/fp32 model (`QuantConfig`) or
a pre-quantized checkpoint's layout. Passes read the description (passes/quantize_linears.py);
models stay free of quantization code. docs/quantization.md is the user's guide.

    fp8_linears.py   Fp8Linear, Fp8Linears (the description), quantize_weight, quantize_model
    checkpoint.py    the FP8 checkpoint layouts (HF fp8, compressed-tensors, ModelOpt)
"""
from trtllm.quantization.fp8_linears import (
    ONLINE_ALGOS,
    Fp8Linear,
    Fp8Linears,
    fp8_linears_of,
    quantize_model,
    quantize_weight,
)

__all__ = ["ONLINE_ALGOS", "Fp8Linear", "Fp8Linears", "fp8_linears_of", "quantize_model", "quantize_weight"]

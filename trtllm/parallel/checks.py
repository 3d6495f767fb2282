"""What a parallel LLM refuses before any process starts, naming the numbers: sizes that do not
divide (heads, KV heads, MLP width, experts, vocabulary), pipelines that do not split the layers,
more ranks than GPUs, architectures outside PARALLEL_ARCHITECTURES, MULTIMODAL_ARCHITECTURES (and
the MoE families of EXPERT_NAMES), and the quantization a split cannot keep exact; and, for a pipeline, its stages.

    stages, tied = check_parallel(path, tp, device_type, pp, pp_partition, moe_ep, quant_algo)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trtllm.config import QuantAlgo
from trtllm.models import gemma, llama, llava, phi3, qwen2_5_vl
from trtllm.models.checkpoint_config import read_json
from trtllm.models.loader import ARCHITECTURES
from trtllm.multimodal_context import is_vision_side
from trtllm.parallel.expert_checkpoint import EXPERT_NAMES, check_moe_config, meta_moe_model
from trtllm.parallel.expert_parallel import ExpertParallel, check_vocab
from trtllm.parallel.pipeline_parallel import check_pipeline_sizes, layer_of, partition_layers
from trtllm.parallel.tensor_parallel import check_sizes
from trtllm.quantization.checkpoint import checkpoint_layout

# Model files whose projections the pass splits and whose layers the pipeline cuts (tested on
# 2 and 4 ranks: tests/parallel; Phi-3's fused qkv_proj / gate_up_proj split into their parts);
# HF-module families load whole (models/hf.py).
PARALLEL_ARCHITECTURES = llama.HF_ARCHITECTURES + gemma.HF_ARCHITECTURES + phi3.HF_ARCHITECTURES
# Multimodal families: their language model (`language_model.*`, llama.py's) splits and cuts as
# the text families do; the vision side stays whole on rank 0, which encodes every image and hands
# the features to the ranks with each step (docs/parallel.md)
MULTIMODAL_ARCHITECTURES = llava.HF_ARCHITECTURES + qwen2_5_vl.HF_ARCHITECTURES


def check_parallel(path: str | os.PathLike, tp: int, device_type: str, pp: int = 1, pp_partition=None,
                   moe_expert_parallel_size: int = 1, quant_algo=None) -> tuple[tuple[tuple[int, int], ...], bool]:
    """Refuse, naming the numbers, what cannot run on tp x pp ranks, before any process starts;
    return the pipeline's stages (first layer, end layer), () for one stage, and whether the LM
    head is tied to the embedding (as the model file reads the config: Gemma's default is tied)."""
    config = read_json(Path(path) / "config.json")
    arch = (config.get("architectures") or ["?"])[0]
    what = f"tensor_parallel_size={tp}" if pp == 1 else f"tensor_parallel_size={tp} x pipeline_parallel_size={pp}"
    moe = ExpertParallel(moe_expert_parallel_size, tp // moe_expert_parallel_size)
    if moe.moe_ep > 1 and arch not in EXPERT_NAMES:
        raise ValueError(f"moe_expert_parallel_size={moe.moe_ep}: {arch} is not a mixture-of-experts model "
                         f"supported under expert parallelism (supported: {', '.join(EXPERT_NAMES)})")
    if arch not in PARALLEL_ARCHITECTURES + MULTIMODAL_ARCHITECTURES and arch not in EXPERT_NAMES:
        kind = "tensor parallelism" if pp == 1 else "tensor / pipeline parallelism"
        raise ValueError(f"{what}: {arch} is not supported under {kind} yet "
                         f"(supported: {', '.join(PARALLEL_ARCHITECTURES + MULTIMODAL_ARCHITECTURES + tuple(EXPERT_NAMES))})")
    if arch in EXPERT_NAMES and quant_algo is not None and moe.moe_tp > 1 and quant_algo != QuantAlgo.FP8_BLOCK_SCALES:
        raise ValueError(f"{what}: FP8 experts ({quant_algo.value}) split by their intermediate features "
                         f"(moe_tensor_parallel_size={moe.moe_tp}) would quantize the intermediate activations per "
                         f"rank: use moe_expert_parallel_size={tp} (whole experts a rank) or FP8_BLOCK_SCALES")
    layout = checkpoint_layout(Path(path), config)  # None: not quantized; an unsupported one raises
    if layout is not None and arch in EXPERT_NAMES:
        raise ValueError(f"{what}: a pre-quantized {arch} checkpoint: its FP8 experts load into our model file "
                         "on one rank; under parallelism (transformers' module) they are not read yet")
    if layout is not None and quant_algo is not None:
        raise ValueError(f"{path} is a pre-quantized {layout.describe()}; QuantConfig(quant_algo="
                         f"{quant_algo.value}) would quantize it again: leave quant_algo unset to load it as it is")
    if device_type == "cuda" and tp * pp > torch.cuda.device_count() and "RANK" not in os.environ:
        raise ValueError(f"{what} needs {tp * pp} GPUs; {torch.cuda.device_count()} visible")
    if arch in EXPERT_NAMES:  # an HF module (models/hf.py): its config.json read as it is
        check_moe_config(config, moe)
        check_pipeline_sizes(pp, config["num_hidden_layers"], pp_partition)
        tied = bool(config.get("tie_word_embeddings", False))
        if pp == 1:
            return (), tied
        return _stages(meta_moe_model(path), config["num_hidden_layers"], pp, pp_partition), tied
    model_cls = ARCHITECTURES[arch]
    model_config = model_cls.config_class.from_hf({k: v for k, v in config.items() if k != "quantization_config"})
    c = getattr(model_config, "text", model_config)  # a multimodal model's language model
    check_sizes(tp, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                intermediate_size=c.intermediate_size)
    check_vocab(c.vocab_size, tp)
    check_pipeline_sizes(pp, c.num_hidden_layers, pp_partition)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    if pp == 1:
        return (), tied
    with torch.device("meta"):  # parameter counts without memory
        model = model_cls(model_config)
    return _stages(model, c.num_hidden_layers, pp, pp_partition), tied


def _stages(model, num_layers: int, pp: int, pp_partition) -> tuple[tuple[int, int], ...]:
    """The pipeline's (first layer, end layer) per stage, balanced by the parameter counts of a
    model built on the meta device (or `pp_partition`); a multimodal model's vision side counts
    to the first stage (rank 0 holds it)."""
    costs, first, last = [0] * num_layers, 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if is_vision_side(model, name):
            first += p.numel()
            continue
        layer = layer_of(name)
        if layer is not None:
            costs[layer] += p.numel()
        elif "embed" in name:
            first += p.numel()
        else:  # final norm, LM head (a tied head: the embedding again, held by the last stage too)
            last += p.numel()
    return tuple(partition_layers(costs, pp, first, last, pp_partition))

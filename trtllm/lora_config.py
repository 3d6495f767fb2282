"""`LoraConfig`: LoRA adapters (PEFT checkpoints) served beside the base model, as TensorRT-LLM
names the config, and `LORA_TARGET_MODULES`, the linears it may target by HF or TensorRT-LLM
name. Validated as the other configs (validated_config.py); also importable from trtllm.config.

    LoraConfig(lora_dir=[], max_lora_rank=64, max_loras=4, max_cpu_loras=4,
               lora_target_modules=[], lora_ckpt_source="hf")
"""

from __future__ import annotations

from pydantic import Field, field_validator

from trtllm.validated_config import ValidatedConfig

# LoRA target modules by name: HF's (peft's target_modules) and TensorRT-LLM's for the same linears
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                       "qkv_proj", "gate_up_proj",  # Phi-3's fused projections
                       # GPT-NeoX's, Falcon's and Bloom's; Phi-1/2's MLP
                       "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2",
                       "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_dense", "mlp_gate", "mlp_h_to_4h",
                       "mlp_4h_to_h", "mlp_gate_up")


class LoraConfig(ValidatedConfig):
    """LoRA adapters (PEFT checkpoints) served beside the base model, many in one batch
    (runtime/adapters.py). An adapter is named per request (`LoRARequest`)."""

    lora_dir: list[str] = Field(
        default_factory=list, description="adapter directories checked when the engine is built; with "
                                          "lora_target_modules empty, their target modules are the ones wrapped")
    max_lora_rank: int = Field(64, gt=0, description="the largest adapter rank accepted (the GPU slots' rank)")
    max_loras: int = Field(4, gt=0, description="adapters resident on the GPU at once (slots)")
    max_cpu_loras: int = Field(4, gt=0, description="adapters kept in host memory (loaded from disk on first use)")
    lora_target_modules: list[str] = Field(
        default_factory=list, description="the linears LoRA may target, by HF or TensorRT-LLM name (empty: those "
                                          "of the adapters in lora_dir, or all attention and MLP linears)")
    lora_ckpt_source: str = Field("hf", description="TensorRT-LLM's: the adapters' format, 'hf' (PEFT) only")

    @field_validator("lora_target_modules")
    @classmethod
    def _known_modules(cls, v):
        unknown = [m for m in v if m not in LORA_TARGET_MODULES]
        if unknown:
            raise ValueError(f"unknown target module(s) {unknown}; known: {', '.join(LORA_TARGET_MODULES)}")
        return v

    @field_validator("lora_ckpt_source")
    @classmethod
    def _peft_only(cls, v):
        if v != "hf":
            raise ValueError("only 'hf' (PEFT adapter directories) is read, not NeMo's .nemo checkpoints")
        return v

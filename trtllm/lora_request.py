"""`LoRARequest`: which LoRA adapter a request runs with (TensorRT-LLM's and vLLM's name).

    LoRARequest(lora_name="math", lora_int_id=1, lora_path="path/to/peft_adapter")

`lora_int_id` (>= 1) names the adapter inside the engine: its GPU slot, its host copy and its
prefix-cache blocks are keyed by it, so one id must always mean one adapter (path).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is empty")
        object.__setattr__(self, "lora_path", str(self.lora_path))

"""`LoRARequest`: which LoRA adapter a request runs with (TensorRT-LLM's and vLLM's name).

    LoRARequest(lora_name="math", lora_int_id=1, lora_path="path/to/peft_adapter")

`lora_int_id` (1 to 2**64 - 1) names the adapter inside the engine: its GPU slot, its host copy and its
prefix-cache blocks are keyed by it, so one id must always mean one adapter (path).

Both projects' spellings are taken: TensorRT-LLM's `lora_ckpt_source` (its 4th field; "hf", a
PEFT directory, is the only one read) and vLLM's older `lora_local_path` (keyword only: the
path), and their properties `name`, `adapter_id`, `path`, `ckpt_source`, `local_path`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_ckpt_source: str = "hf"
    lora_local_path: str | None = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or not 1 <= self.lora_int_id < 2**64:  # TensorRT-LLM's uint64 (block_manager hashes 8 bytes)
            raise ValueError(f"LoRARequest.lora_int_id must be an integer from 1 to 2**64 - 1, got {self.lora_int_id!r}")
        if self.lora_ckpt_source != "hf":  # TensorRT-LLM also reads NeMo's .nemo checkpoints
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_ckpt_source {self.lora_ckpt_source!r} is not "
                             "supported; only 'hf' (a PEFT adapter directory)")
        self._take_local_path()
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is empty")
        object.__setattr__(self, "lora_path", str(self.lora_path))

    def _take_local_path(self) -> None:
        """vLLM's lora_local_path, the path under its older name."""
        local = self.lora_local_path
        if local is None:
            return
        if self.lora_path and str(self.lora_path) != str(local):
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path {str(self.lora_path)!r} and lora_local_path "
                             f"{str(local)!r} differ (they are one field under two names)")
        object.__setattr__(self, "lora_path", str(local))
        object.__setattr__(self, "lora_local_path", None)

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def local_path(self) -> str:
        return self.lora_path

    @property
    def ckpt_source(self) -> str:
        return self.lora_ckpt_source

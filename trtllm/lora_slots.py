"""How LoRA adapters reach compiled graphs: fixed GPU slots and a per-token slot index.

`LoraSlots` (below compile and runtime, as attention_context.py is for the KV cache) holds

- `slot_ids` [max_num_tokens] int64: token t of a step uses the adapter in slot
  slot_ids[t], -1 for none. The runtime refills its first T entries in place every step
  (model_runner.py), so a captured CUDA graph replays with the step's adapters;
- per group of linears the pass wrapped (passes/apply_lora.py), the slot weights
  `lora_a` [max_loras, n * R, K] and `lora_b` [max_loras, N, n * R] (R = max_lora_rank;
  n linears share one GEMM after fuse_parallel_linears, as q/k/v and gate/up do: their
  A's stacked, their B's block-diagonal, zero off the blocks).

A step (or a CUDA graph being captured) in which no token has an adapter runs inside
kernels/linear_lora.py's `no_adapters()`: the fused LoRA linears launch the base linear alone.

The pass makes a group when it first meets the linears (`group`), a later compilation of
the same model gets the same tensors back; the adapter cache (runtime/adapters.py) writes an
adapter's weights into a slot (`load`), zero past its rank and for the modules it leaves
alone. The tensors never move: graphs hold their addresses.

Under tensor parallelism a rank's slots hold its part of each adapter (`shards`, recorded by
passes/shard_tensor_parallel.py): the rows of B of a column-parallel linear (its output
features), the columns of A of a row-parallel one (its input features; the partial shrink,
expanded by the whole B, is summed by the linear's own all-reduce: B is linear). Under pipeline
parallelism a rank wraps its stage's linears only; `elsewhere` lists the other ranks' (whole
features), so an adapter is checked against the whole model and each rank writes its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The linears LoRA targets by default: the attention projections and the MLP's, as HF
# names them (peft's target_modules). TensorRT-LLM's names map onto them.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                          "qkv_proj", "gate_up_proj",  # Phi-3's fused projections
                          # GPT-NeoX's, Falcon's and Bloom's (fused QKV, attention output, MLP); Phi-1/2's MLP
                          "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2")
# TensorRT-LLM's names (its get_default_trtllm_modules_to_hf_modules: its GatedMLP's `fc` is HF's
# gate_proj, its `gate` HF's up_proj), each with the other families' names for the same linear
TRTLLM_MODULE_NAMES = {"attn_q": ("q_proj",), "attn_k": ("k_proj",), "attn_v": ("v_proj",),
                       "attn_qkv": ("qkv_proj", "query_key_value"), "attn_dense": ("o_proj", "dense"),
                       "mlp_h_to_4h": ("gate_proj", "dense_h_to_4h", "fc1"), "mlp_gate": ("up_proj",),
                       "mlp_4h_to_h": ("down_proj", "dense_4h_to_h", "fc2"), "mlp_gate_up": ("gate_up_proj",)}


@dataclass(frozen=True)
class LoraPart:
    """One wrapped linear: its module path and its columns of the group's output."""
    path: str
    start: int
    size: int


@dataclass
class LoraGroup:
    parts: tuple[LoraPart, ...]
    in_features: int
    out_features: int
    lora_a: torch.Tensor  # [max_loras, len(parts) * R, in_features]
    lora_b: torch.Tensor  # [max_loras, out_features, len(parts) * R]


class LoraSlots:
    def __init__(self, max_loras: int, max_lora_rank: int, target_modules, max_num_tokens: int,
                 device: torch.device | str, module_path=None):
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        # an adapter's module path -> the compiled module's ("model." + it for an HF module, which
        # compiles inside models/hf.py's HFCausalLM; a model file's checkpoint_name for its other
        # layouts: contract.adapter_module_path); None: the same
        self.module_path = module_path or (lambda path: path)
        self.target_modules = frozenset(name for m in target_modules for name in TRTLLM_MODULE_NAMES.get(m, (m,)))
        self.device = torch.device(device)
        self.slot_ids = torch.full((max_num_tokens,), -1, dtype=torch.long, device=self.device)
        self.groups: dict[tuple[LoraPart, ...], LoraGroup] = {}
        self.modules: dict[str, tuple[LoraGroup, int]] = {}  # path -> its group and index in it
        # path -> (dim, ((start, length), ...), whole): dim 0: B's rows [start, start + length) of
        # `whole` output features (several ranges for a fused projection's parts, in row order);
        # dim 1: A's columns of `whole` input features (a tensor-parallel rank)
        self.shards: dict[str, tuple[int, tuple[tuple[int, int], ...], int]] = {}
        self.elsewhere: dict[str, tuple[int, int]] = {}  # other ranks' wrapped linears: path -> (K, N)

    def targets(self, path: str) -> bool:
        """Whether the linear at module path `path` is one LoRA wraps."""
        return bool(path) and path.rsplit(".", 1)[-1] in self.target_modules

    def group(self, parts: list[LoraPart], in_features: int, out_features: int, dtype: torch.dtype) -> LoraGroup:
        """The slot weights of these linears (made on first call, the same tensors after)."""
        key = tuple(parts)
        found = self.groups.get(key)
        if found is not None:
            return found
        taken = [p.path for p in parts if p.path in self.modules]
        if taken:
            raise ValueError(f"LoRA: {taken[0]} is wrapped again in another group of linears than before")
        r = len(parts) * self.max_lora_rank
        group = LoraGroup(key, in_features, out_features,
                          torch.zeros((self.max_loras, r, in_features), dtype=dtype, device=self.device),
                          torch.zeros((self.max_loras, out_features, r), dtype=dtype, device=self.device))
        self.groups[key] = group
        for i, p in enumerate(parts):
            self.modules[p.path] = (group, i)
        return group

    def shard(self, path: str, dim: int, start: int, length: int, whole: int) -> None:
        """This rank holds features [start, start + length) of `whole` of the linear at `path`:
        its outputs (dim 0, column-parallel; a fused projection's parts add a range each) or its
        inputs (dim 1, row-parallel)."""
        ranges = self.shards[path][1] if dim == 0 and path in self.shards else ()
        self.shards[path] = (dim, tuple(sorted({*ranges, (start, length)})), whole)

    def features(self, path: str) -> tuple[int, int] | None:
        """(in, out) features of the whole linear an adapter names `path` as its A [r, in] and
        B [out, r] must be shaped, if this engine wraps it on any rank; else None."""
        return self._features(self.module_path(path))

    def _features(self, path: str) -> tuple[int, int] | None:
        if path not in self.modules:
            return self.elsewhere.get(path)
        group, i = self.modules[path]
        k, n = group.in_features, group.parts[i].size
        dim, _, whole = self.shards.get(path, (None, (), 0))
        return (whole, n) if dim == 1 else (k, whole) if dim == 0 else (k, n)

    def wrapped(self) -> dict[str, tuple[int, int]]:
        """This rank's wrapped linears: path -> whole (in, out) features."""
        return {path: self._features(path) for path in self.modules}

    def image(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], pin: bool = False
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """An adapter laid out as one slot holds it, on the host: per group (in `groups`
        order) its (lora_a [n R, K], lora_b [N, n R]), zero past each module's rank and for
        the modules the adapter leaves alone. weights[path] = (A [r, K], B [N, r] with the
        scaling folded in, the whole linear's: a tensor-parallel rank takes its `shards`),
        r <= max_lora_rank. `pin`: in pinned memory (a GPU's copies)."""
        rank = self.max_lora_rank
        image = [(torch.zeros(g.lora_a.shape[1:], dtype=g.lora_a.dtype), torch.zeros(g.lora_b.shape[1:],
                                                                                   dtype=g.lora_b.dtype))
                 for g in self.groups.values()]
        index = {id(g): i for i, g in enumerate(self.groups.values())}
        for path, (a, b) in weights.items():
            path = self.module_path(path)
            if path not in self.modules:  # another pipeline stage's linear (checked: `elsewhere`)
                continue
            dim, ranges, _ = self.shards.get(path, (None, (), 0))
            if dim == 0:
                b = torch.cat([b[start:start + length] for start, length in ranges])
            elif dim == 1:
                (start, length), = ranges
                a = a[:, start:start + length]
            group, i = self.modules[path]
            part, r = group.parts[i], a.shape[0]
            a_img, b_img = image[index[id(group)]]
            a_img[i * rank: i * rank + r].copy_(a)
            b_img[part.start: part.start + part.size, i * rank: i * rank + r].copy_(b)
        return [(a.pin_memory(), b.pin_memory()) for a, b in image] if pin else image

    def load_image(self, slot: int, image: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter's `image` into `slot`: two copies a group (from pinned memory:
        asynchronous, queued on the current stream). 7 linears x 32 layers written piece by
        piece after each group was zeroed were 704 launches for Llama-8B (448 copies + 256 zero fills),
        and a load took 5.7-11.9 ms on the H200; 256 copies take 3.08 ms (bench_lora, 2026-12-03)."""
        assert len(image) == len(self.groups), f"an image of {len(image)} groups for {len(self.groups)} slots' groups"
        for group, (a, b) in zip(self.groups.values(), image):
            group.lora_a[slot].copy_(a, non_blocking=True)
            group.lora_b[slot].copy_(b, non_blocking=True)

    def load(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter into `slot`: weights[path] = (A [r, K], B [N, r] with the
        scaling folded in), r <= max_lora_rank; modules it does not name get zeros."""
        self.load_image(slot, self.image(weights))

    def nbytes(self) -> int:
        return sum(g.lora_a.nbytes + g.lora_b.nbytes for g in self.groups.values()) + self.slot_ids.nbytes


"""Checkpoints' per-expert tensors as slices of a model file's 3-D expert parameters.

MoE checkpoints hold one tensor per expert and projection (`{prefix}.experts.{e}.gate_proj.weight`);
transformers 5, and models/qwen3_moe.py, hold a layer's experts as two 3-D parameters
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]). A model file says which
projection lands where with `expert_tensors` ({projection: (parameter, row block)}); models/loader.py
checks every block is there and stacks them as they stream in.
"""
from __future__ import annotations

import re

import torch


class ExpertSlots:
    """A model file's `expert_tensors` ({checkpoint projection: (3-D parameter, row block)}, e.g.
    models/qwen3_moe.py's): `slot(name)` of a checkpoint tensor `{prefix}.experts.{e}.{proj}.weight`
    is (`{prefix}.experts.{parameter}`, e, row block), else None. Row block r of a parameter
    [E, R, C] taking n projections is rows [r R/n, (r + 1) R/n) of expert e."""

    def __init__(self, tensors: dict[str, tuple[str, int]] | None):
        self.tensors = tensors or {}
        self.parts = {param: 1 + max(r for p, r in self.tensors.values() if p == param)
                      for param, _ in self.tensors.values()}
        # the 3-D parameters being filled, expert by expert (`put`): in the model's dtype, or FP8 as
        # stored (a pre-quantized checkpoint's experts: their scales are the loader's FP8 reader's)
        self.stacks: dict[str, torch.Tensor] = {}
        self.fp8_stacks: dict[str, torch.Tensor] = {}

    def put(self, slot: tuple[str, int, int], t: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
            device) -> None:
        """One expert's projection `t` into its rows of the parameter `slot` names ([E, R, C] `shape`)."""
        param, e, rows = slot
        fp8 = t.dtype == torch.float8_e4m3fn
        stacks, other = (self.fp8_stacks, self.stacks) if fp8 else (self.stacks, self.fp8_stacks)
        if param in other:
            raise ValueError(f"{param}: the checkpoint's per-expert tensors mix float8 and {dtype} (expert {e})")
        if param not in stacks:
            stacks[param] = torch.empty(shape, dtype=t.dtype if fp8 else dtype, device=device)
        stacks[param][e, rows * t.shape[0]:(rows + 1) * t.shape[0]].copy_(t)

    def projections(self, param: str) -> list[str]:
        """The checkpoint projections that make `param` (a path ending in a 3-D parameter's name), in row order."""
        leaf = param.rpartition(".")[2]
        return [proj for proj, (p, _) in sorted(self.tensors.items(), key=lambda kv: kv[1][1]) if p == leaf]

    def __call__(self, name: str) -> tuple[str, int, int] | None:
        if not self.tensors:
            return None
        match = EXPERT_TENSOR.match(name)
        if match is None or match.group(3) not in self.tensors:
            return None
        param, rows = self.tensors[match.group(3)]
        return f"{match.group(1)}.{param}", int(match.group(2)), rows

    def shape(self, param_shape: torch.Size, param: str) -> torch.Size:
        """One projection's shape in a 3-D parameter of `param_shape`."""
        return torch.Size((param_shape[1] // self.parts[param.rpartition(".")[2]], param_shape[2]))

    def complete(self, filled: dict[str, set[tuple[int, int]]], expected: dict[str, torch.Size]) -> list[str]:
        """The parameters `filled` ({parameter: (expert, row block) read}) makes whole; raises,
        naming the absent tensors, where a block is missing."""
        for param, blocks in filled.items():
            size = expected[param][0] * self.parts[param.rpartition(".")[2]]
            if len(blocks) != size:
                prefix, _, leaf = param.rpartition(".")
                names = {rows: proj for proj, (p, rows) in self.tensors.items() if p == leaf}
                absent = [f"{prefix}.{e}.{names[r]}.weight" for e in range(expected[param][0]) for r in sorted(names)
                          if (e, r) not in blocks]
                raise ValueError(f"the checkpoint holds {len(blocks)} of the {size} per-expert tensors that make "
                                 f"{param!r}: absent {absent[:3]}{' ...' if len(absent) > 3 else ''}")
        return list(filled)


EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")

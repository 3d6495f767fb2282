"""Qwen2.5-VL's vision encoder (ViT with windowed attention, 2-D rotary and a patch merger) as a
plain module; Qwen2-VL's too (`Qwen25VisionConfig.from_hf` of a `qwen2_vl` config: LayerNorm for
RMSNorm, an fc1-act-fc2 MLP for SwiGLU, every block full attention, no windows).

    layout = vision_layout(config, grids)         # host: index tensors from the images' grids
    features = tower(pixels, *layout.tensors())   # [sum N_i, C*T*P*P] -> [sum N_i / m^2, out_hidden]

The images of a batch are packed into one sequence of N patches (each [C * T * P * P]: C
channels, T = temporal_patch_size frames, P x P pixels, in the processor's order, which lists
the patches of each m x m merge block together). Per block: RMSNorm, self-attention with 2-D
rotary (the first quarter of the frequencies turned by a patch's row, the second by its column,
as HF's axial rope), RMSNorm, SwiGLU MLP. The blocks in `fullatt_block_indexes` attend over
each whole image (frame), the others within windows of `window_size` pixels (HF's
`get_vision_window_index`: windows of (window_size / m / P)^2 merge blocks, cut at the image's
right and bottom edges, so they differ in size). For the windows the patches are reordered
window by window (`window_index`, at merge-block granularity) before the blocks and put back
after the merger (`reverse_index`), so every segment, window or image, is a run of consecutive
tokens and attention is `torch.ops.trtllm.segment_attention` (kernels/segment_attention.py)
over per-token segment bounds. The merger: RMSNorm, m x m neighbours concatenated,
Linear-GELU-Linear to the language model's width.

Everything that depends on the grids' values (windows, positions, bounds) is computed on the
host by `vision_layout`, so the forward is one graph that `trtllm.compile_encoder` captures
whole (fullgraph); only N varies.

Checkpoint names are HF's (`visual.patch_embed.proj`, `visual.blocks.{i}.attn.qkv`,
`.attn.proj`, `.mlp.{gate,up,down}_proj`, `.norm1`, `.norm2`, `visual.merger.ln_q`,
`visual.merger.mlp.{0,2}`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.kernels.segment_attention import segment_attention, segment_bounds
from trtllm.models.llama import RMSNorm, rotate_half

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@dataclass
class Qwen25VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    qwen2_vl: bool = False  # Qwen2-VL's blocks: LayerNorm, fc1-act-fc2 MLP, no windows (window_size 0)

    @classmethod
    def from_hf(cls, d: dict[str, Any], qwen2_vl: bool = False) -> Qwen25VisionConfig:
        act = d.get("hidden_act", "quick_gelu" if qwen2_vl else "silu")
        if act not in _ACTS:
            raise ValueError(f"vision_config.hidden_act={act!r} is not supported ({sorted(_ACTS)})")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"vision_config rope_type={rope.get('rope_type')!r}: Qwen2.5-VL's vision rope is axial")
        if qwen2_vl:  # embed_dim is the tower's width, hidden_size the language model's
            width, depth = d.get("embed_dim", 1280), d.get("depth", 32)
            return cls(depth=depth, hidden_size=width, intermediate_size=int(width * d.get("mlp_ratio", 4)),
                       num_heads=d.get("num_heads", 16), out_hidden_size=d["hidden_size"],
                       in_channels=d.get("in_channels", d.get("in_chans", 3)), patch_size=d.get("patch_size", 14),
                       spatial_merge_size=d.get("spatial_merge_size", 2),
                       temporal_patch_size=d.get("temporal_patch_size", 2), window_size=0,
                       fullatt_block_indexes=list(range(depth)), hidden_act=act,
                       rope_theta=float(rope.get("rope_theta", 10000.0)), qwen2_vl=True)
        config = cls(depth=d["depth"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                     num_heads=d["num_heads"], out_hidden_size=d["out_hidden_size"],
                     in_channels=d.get("in_channels", d.get("in_chans", 3)), patch_size=d.get("patch_size", 14),
                     spatial_merge_size=d.get("spatial_merge_size", 2),
                     temporal_patch_size=d.get("temporal_patch_size", 2), window_size=d.get("window_size", 112),
                     fullatt_block_indexes=list(d.get("fullatt_block_indexes") or []), hidden_act=act,
                     rope_theta=float(rope.get("rope_theta", 10000.0)))
        if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
            raise ValueError(f"vision hidden_size {config.hidden_size} / num_heads {config.num_heads}: the head dim "
                             "must be a multiple of 4 (2-D rotary)")
        if config.window_size % (config.spatial_merge_size * config.patch_size):
            raise ValueError(f"vision window_size {config.window_size} is not a multiple of spatial_merge_size x "
                             f"patch_size = {config.spatial_merge_size * config.patch_size}")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # one patch's values, as the processor flattens it
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass
class VisionLayout:
    """Host-computed indices of one batch of images (see `vision_layout`)."""
    positions: torch.Tensor      # [N, 2] int64: each patch's (row, column), in window order
    window_index: torch.Tensor   # [N / m^2] int64: merge block k of window order is block window_index[k]
    reverse_index: torch.Tensor  # [N / m^2] int64: back to the processor's order
    full_bounds: tuple[torch.Tensor, torch.Tensor]    # [N] int32 each: each patch's image (frame) segment
    window_bounds: tuple[torch.Tensor, torch.Tensor]  # [N] int32 each: each patch's window segment

    def tensors(self, device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in (self.positions, self.window_index, self.reverse_index,
                                            *self.full_bounds, *self.window_bounds))


def vision_layout(config: Qwen25VisionConfig, grids: list[tuple[int, int, int]]) -> VisionLayout:
    """The patch order, rotary positions and attention segments of images with grids (t, h, w)
    (in patches), as HF's get_vision_position_ids / get_vision_window_index /
    get_vision_cu_seqlens compute them."""
    m = config.spatial_merge_size
    ws = config.window_size // m // config.patch_size  # window side in merge blocks; 0: no windows
    positions, window_index, window_lengths, frame_lengths = [], [], [], []
    base = 0
    for t, h, w in grids:
        if h % m or w % m:
            raise ValueError(f"image grid {t}x{h}x{w} is not a multiple of spatial_merge_size {m}")
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([rows.reshape(h // m, m, w // m, m).transpose(1, 2).flatten(),
                          cols.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()], dim=-1)  # [h*w, 2]
        positions.append(hw.repeat(t, 1))
        frame_lengths += [h * w] * t
        gh, gw = h // m, w // m
        side = ws or max(gh, gw)  # no windows: one window a frame, the processor's order kept
        blocks = torch.arange(t * gh * gw).reshape(t, gh, gw) + base
        for f in range(t):
            for y in range(0, gh, side):
                for x in range(0, gw, side):
                    window = blocks[f, y:y + side, x:x + side].flatten()
                    window_index.append(window)
                    window_lengths.append(window.numel() * m * m)
        base += t * gh * gw
    window_index = torch.cat(window_index)
    unit = m * m
    pos = torch.cat(positions).reshape(-1, unit, 2)[window_index].reshape(-1, 2)

    def bounds(lengths: list[int]):
        return segment_bounds(F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32))

    return VisionLayout(pos, window_index, torch.argsort(window_index), bounds(frame_lengths), bounds(window_lengths))


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.shape = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=self.shape[1:],
                              stride=self.shape[1:], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C*T*P*P] -> [N, hidden]
        x = x.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).view(x.shape[0], -1)


class VisionRotary(nn.Module):
    """2-D rope: cos/sin [N, head_dim] from (row, column) positions [N, 2]."""

    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.dim, self.theta = config.head_dim // 2, config.rope_theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))

    def init_buffers(self, device) -> None:
        self.inv_freq = self._inv_freq().to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()  # [N, 2, head_dim / 4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [N, head_dim / 2]: rows, then columns
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg_start: torch.Tensor,
                seg_end: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]  # x [N, hidden]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, D] each
        c, s = cos[:, None], sin[:, None]  # [N, 1, D]: rotary in fp32, as HF
        q = (q.float() * c + rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(x.dtype)
        y = segment_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), seg_start, seg_end,
                              self.head_dim ** -0.5)  # [H, N, D]
        return self.proj(y.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        d, ff = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=True), nn.Linear(d, ff, bias=True)
        self.down_proj = nn.Linear(ff, d, bias=True)
        self.act = _ACTS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):  # Qwen2-VL
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _norm(config: Qwen25VisionConfig) -> nn.Module:
    return nn.LayerNorm(config.hidden_size, eps=1e-6) if config.qwen2_vl else RMSNorm(config.hidden_size, 1e-6)


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(config), _norm(config)
        self.attn = VisionAttention(config)
        self.mlp = PlainMLP(config) if config.qwen2_vl else VisionMLP(config)

    def forward(self, x, cos, sin, seg_start, seg_end):
        x = x + self.attn(self.norm1(x), cos, sin, seg_start, seg_end)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.width = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = _norm(config)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N / m^2, out_hidden]
        return self.mlp(self.ln_q(x).view(-1, self.width))


class Qwen25VisionTransformer(nn.Module):
    def __init__(self, config: Qwen25VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.rotary_pos_emb = VisionRotary(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.full = frozenset(config.fullatt_block_indexes)

    def init_buffers(self, device) -> None:
        self.rotary_pos_emb.init_buffers(device)

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, window_index: torch.Tensor,
                reverse_index: torch.Tensor, full_start: torch.Tensor, full_end: torch.Tensor,
                window_start: torch.Tensor, window_end: torch.Tensor) -> torch.Tensor:
        """pixels [N, C*T*P*P] (processor order) and `VisionLayout.tensors()` -> [N / m^2, out_hidden]."""
        unit = self.config.spatial_merge_size ** 2
        x = self.patch_embed(pixels)  # [N, hidden]
        n = x.shape[0]
        x = x.view(n // unit, unit, -1)[window_index].reshape(n, -1)  # window order
        cos, sin = self.rotary_pos_emb(positions)  # [N, head_dim], fp32
        for i, block in enumerate(self.blocks):
            if i in self.full:
                x = block(x, cos, sin, full_start, full_end)
            else:
                x = block(x, cos, sin, window_start, window_end)
        return self.merger(x)[reverse_index]  # [N / m^2, out_hidden], processor order


def merged_tokens(config: Qwen25VisionConfig, grid: tuple[int, int, int]) -> int:
    """The language-model tokens of an image of grid (t, h, w)."""
    return math.prod(grid) // config.spatial_merge_size ** 2

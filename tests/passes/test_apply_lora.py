"""passes/apply_lora.py on captured graphs: the targeted linears (alone, or the parts of a fused
GEMM after fuse_parallel_linears) get lora_shrink + lora_expand over the slots; others are left
alone; tokens without an adapter get the linear's own output; the numbers are the per-token
LoRA formula."""
import torch
import torch.nn as nn

from tests.passes.graph_capture import Captured
from trtllm.lora_slots import LoraSlots
from trtllm.passes.apply_lora import apply_lora
from trtllm.passes.fuse_parallel_linears import fuse_parallel_linears

K, NQ, NKV, RANK = 24, 32, 16, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(K, NQ), nn.Linear(K, NKV), nn.Linear(K, NKV)
        self.o_proj = nn.Linear(NQ + 2 * NKV, K, bias=False)
        self.proj = nn.Linear(K, K)  # not a LoRA target

    def forward(self, x):
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return self.proj(self.o_proj(torch.relu(qkv)))


def captured(block, x, targets=("q_proj", "v_proj", "o_proj"), slots=None):
    cap = Captured(block, x)
    cap.ctx.lora = slots or LoraSlots(3, RANK, targets, max_num_tokens=16, device="cpu")
    assert cap.apply(fuse_parallel_linears) == 1
    return cap


def lora_reference(block, x, slot_of_token, adapters):
    """The block with each token's adapter merged into its weights (W + B A)."""
    out = []
    for t, s in enumerate(slot_of_token):
        ws = {n: getattr(block, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if s >= 0:
            for name, (a, b) in adapters[s].items():
                ws[name.rsplit(".", 1)[-1]] += b @ a
        xt = x[0, t]
        qkv = torch.cat([xt @ ws[n].T + getattr(block, n).bias for n in ("q_proj", "k_proj", "v_proj")])
        out.append(block.proj(torch.relu(qkv) @ ws["o_proj"].T))
    return torch.stack(out)[None]


def test_targeted_linears_get_their_adapter_per_token():
    block, x = Block().eval(), torch.randn(1, 6, K)
    cap = captured(block, x)
    assert cap.apply(apply_lora) == 2  # the fused q/k/v GEMM (its q and v parts) and o_proj
    assert cap.count(torch.ops.trtllm.lora_shrink.default) == cap.count(torch.ops.trtllm.lora_expand.default) == 2
    slots = cap.ctx.lora
    assert sorted(slots.modules) == ["o_proj", "q_proj", "v_proj"]
    group, _ = slots.modules["q_proj"]
    assert group.lora_a.shape == (3, 2 * RANK, K) and group.lora_b.shape == (3, NQ + 2 * NKV, 2 * RANK)
    adapters = []
    for s, rank in enumerate((4, 2, 3)):  # ranks up to the slots' rank
        weights = {n: (torch.randn(rank, slots.features(n)[0]), torch.randn(slots.features(n)[1], rank))
                   for n in ("q_proj", "v_proj", "o_proj")[: 3 - s]}  # slot 2 leaves v and o alone
        slots.load(s, weights)
        adapters.append(weights)
    slot_of_token = [0, 0, -1, 1, 2, -1]
    slots.slot_ids[:6] = torch.tensor(slot_of_token)
    with torch.no_grad():
        got = cap.run()
        torch.testing.assert_close(got, lora_reference(block, x, slot_of_token, adapters), atol=1e-4, rtol=1e-4)
        base = block(x)
    for t in (2, 5):  # no adapter: exactly the model's own output
        torch.testing.assert_close(got[0, t], base[0, t], atol=1e-6, rtol=1e-6)


def test_a_second_compilation_gets_the_same_slots():
    block, x = Block().eval(), torch.randn(1, 3, K)
    first = captured(block, x)
    first.apply(apply_lora)
    again = captured(block, torch.randn(1, 5, K), slots=first.ctx.lora)
    again.apply(apply_lora)
    slots = first.ctx.lora
    assert len(slots.groups) == 2
    lora_tensors = {id(slots.slot_ids)} | {id(t) for g in slots.groups.values() for t in (g.lora_a, g.lora_b)}
    for cap in (first, again):  # both graphs read the very same slot tensors (fixed addresses)
        assert lora_tensors <= {id(t) for t in cap.inputs.constants}


def test_no_target_no_change():
    block, x = Block().eval(), torch.randn(1, 3, K)
    cap = captured(block, x, targets=("gate_proj",))
    assert cap.apply(apply_lora) == 0
    assert cap.count(torch.ops.trtllm.lora_shrink.default) == 0
    cap.ctx.lora = None
    assert cap.apply(apply_lora) == 0

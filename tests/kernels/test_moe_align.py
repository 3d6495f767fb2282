import pytest
import torch

from trtllm.kernels.moe_align import max_padded_slots, moe_align, moe_align_ref


def random_ids(tokens, experts, top_k):
    """Distinct experts per token, as routing gives."""
    return torch.rand(tokens, experts).argsort(dim=-1)[:, :top_k].to(torch.int32)


def check(ids, experts, block_m):
    out = moe_align(ids, experts, block_m)
    ref = moe_align_ref(ids, experts, block_m)
    for got, want, name in zip(out, ref, ("sorted_ids", "expert_ids", "num_tokens_post_padded"), strict=True):
        assert got.dtype == torch.int32, name
        assert torch.equal(got, want), name
    return ref


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 1), (7, 8, 2), (83, 64, 8), (83, 4, 2), (1, 64, 8), (300, 8, 2)])
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_matches_reference(tokens, experts, top_k, block_m):
    check(random_ids(tokens, experts, top_k), experts, block_m)


def test_reference_layout():
    # Slots 0..5 of 3 tokens x k=2: experts [[2, 0], [2, 3], [0, 2]]; expert 1 gets none.
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, total = moe_align_ref(ids, 4, 4)
    pad = 6
    assert total.tolist() == [12]
    assert sorted_ids[:12].tolist() == [1, 4, pad, pad, 0, 2, 5, pad, 3, pad, pad, pad]
    assert (sorted_ids[12:] == pad).all() and len(sorted_ids) == max_padded_slots(6, 4, 4) == 6 + 4 * 3
    assert expert_ids.tolist()[:3] == [0, 2, 3] and (expert_ids[3:] == -1).all()
    check(ids, 4, 4)


def test_every_slot_exactly_once_in_its_experts_blocks():
    ids = random_ids(83, 64, 8)
    sorted_ids, expert_ids, total = check(ids, 64, 16)
    n = int(total)
    slots = sorted_ids[:n]
    real = slots[slots < ids.numel()].long()
    assert torch.equal(real.sort().values, torch.arange(ids.numel()))
    block_expert = expert_ids.repeat_interleave(16)[:n][slots < ids.numel()]
    assert torch.equal(ids.flatten()[real], block_expert)


def test_out_of_range_ids_are_dropped():
    ids = torch.tensor([[0, -1], [5, 1]], dtype=torch.int32)  # -1 and 5: not experts of E=4
    sorted_ids, _, total = check(ids, 4, 2)
    assert sorted_ids[:int(total)].tolist() == [0, 4, 3, 4]


def test_empty():
    sorted_ids, expert_ids, total = check(torch.empty(0, 2, dtype=torch.int32), 8, 16)
    assert sorted_ids.numel() == 0 and total.tolist() == [0]


@pytest.mark.parametrize("fn", [moe_align, moe_align_ref])
def test_bad_input_names_the_argument(fn):
    with pytest.raises(ValueError, match="topk_ids"):
        fn(torch.zeros(3, 2, dtype=torch.int64), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        fn(torch.zeros(3, 2, dtype=torch.int32), 4, 0)
    with pytest.raises(ValueError, match="num_experts"):
        fn(torch.zeros(3, 2, dtype=torch.int32), 0, 16)


def test_opcheck():
    torch.library.opcheck(torch.ops.trtllm.moe_align.default, (random_ids(7, 8, 2), 8, 16))

"""count_experts: each expert's routed slots added to a running count; padding tokens
(cache slot -1) and ids of other ranks' experts left out."""
import pytest
import torch

from trtllm.kernels.count_experts import count_experts, count_experts_ref


@pytest.mark.parametrize("fn", [count_experts, count_experts_ref])
def test_counts_add_up_and_skip_padding_and_foreign_ids(fn):
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [1, 2], [-1, 7]], dtype=torch.int32)  # expert 4 gets none
    counts = torch.full((5,), 10, dtype=torch.int64)
    fn(ids, counts, None)
    assert counts.tolist() == [12, 11, 14, 11, 10]
    slots = torch.tensor([5, -1, 9, 3, 4, 8], dtype=torch.int32)  # token 1 is padding; longer than T
    fn(ids, counts, slots)
    assert counts.tolist() == [14, 12, 17, 11, 10]


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 1), (83, 8, 2), (300, 64, 8)])
def test_matches_reference(tokens, experts, top_k):
    ids = torch.rand(tokens, experts).argsort(dim=-1)[:, :top_k].to(torch.int32)
    slots = torch.where(torch.rand(tokens) < 0.2, -1, 1).to(torch.int32)
    got, want = torch.zeros(experts, dtype=torch.int64), torch.zeros(experts, dtype=torch.int64)
    count_experts(ids, got, slots)
    count_experts_ref(ids, want, slots)
    assert torch.equal(got, want) and got.sum() == top_k * (slots >= 0).sum()


@pytest.mark.parametrize("fn", [count_experts, count_experts_ref])
def test_bad_input_names_the_argument(fn):
    ids = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_ids"):
        fn(ids.long(), torch.zeros(4, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="counts"):
        fn(ids, torch.zeros(4, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="token_slots"):
        fn(ids, torch.zeros(4, dtype=torch.int64), torch.zeros(2, dtype=torch.int32))


def test_opcheck():
    ids = torch.rand(7, 8).argsort(dim=-1)[:, :2].to(torch.int32)
    torch.library.opcheck(torch.ops.trtllm.count_experts.default,
                          (ids, torch.zeros(8, dtype=torch.int64), torch.ones(7, dtype=torch.int32)))

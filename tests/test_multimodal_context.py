"""trtllm.splice_embeddings and its fixed-address buffers (multimodal_context.py), and the
engine's encoder cache (runtime/multimodal_stager.py)."""
import pytest
import torch

from trtllm.multimodal_context import MultimodalEmbeddings, multimodal_context, splice_embeddings
from trtllm.runtime.multimodal_inputs import ImageSpan, MultimodalData
from trtllm.runtime.multimodal_stager import EncoderCache


def test_splice_replaces_rows_and_keeps_text():
    x = torch.randn(1, 6, 4)
    mm = MultimodalEmbeddings(8, 4, torch.float32, "cpu")
    features = torch.randn(3, 4)
    mm.fill(torch.tensor([-1, 0, 1, 2, -1, -1]), features)
    with multimodal_context(mm):
        out = splice_embeddings(x)
    torch.testing.assert_close(out[0, 1:4], features)
    torch.testing.assert_close(out[0, [0, 4, 5]], x[0, [0, 4, 5]])
    # outside any context, and after a step without images: the input as it is
    torch.testing.assert_close(splice_embeddings(x), x)
    mm.fill(None, None)
    assert (mm.rows == -1).all()
    with multimodal_context(mm):
        torch.testing.assert_close(splice_embeddings(x), x)


def test_fill_clears_the_last_steps_rows_past_this_one():
    mm = MultimodalEmbeddings(8, 2, torch.float32, "cpu")
    mm.fill(torch.tensor([0, 1, 2, 3, 4, 5]), torch.randn(6, 2))
    mm.fill(torch.tensor([-1, 0]), torch.randn(1, 2))
    assert mm.rows.tolist() == [-1, 0] + [-1] * 6
    with pytest.raises(ValueError, match="exceed the multimodal buffers"):
        mm.fill(torch.zeros(9, dtype=torch.long), torch.randn(1, 2))


def test_opcheck():
    torch.library.opcheck(torch.ops.trtllm.splice_embeddings.default, (torch.randn(1, 3, 4),))


def _span(tag: bytes, offset: int = 0, length: int = 2) -> ImageSpan:
    return ImageSpan(tag * 16, offset, length, torch.zeros(3, 4, 4))


def test_encoder_cache_encodes_each_image_once_and_evicts_lru():
    calls = []

    def encode(images):
        calls.append(len(images))
        return [torch.full((2, 3), float(len(calls))) for _ in images]

    cache = EncoderCache(encode, capacity=2)
    a, b, c = _span(b"a"), _span(b"b"), _span(b"c")
    cache.get([a, b, a])  # a twice in one step: encoded once
    assert calls == [2] and cache.num_encoded == 2
    cache.get([a])
    assert calls == [2] and cache.num_hits == 2
    cache.get([c])  # evicts b (a was used since)
    cache.get([a])
    assert cache.num_encoded == 3
    cache.get([b])
    assert cache.num_encoded == 4
    with pytest.raises(ValueError, match="3 features but its prompt holds 2"):
        EncoderCache(lambda ims: [torch.zeros(3, 1) for _ in ims]).get([c])


def test_block_key_names_the_images_of_a_block():
    mm = MultimodalData([_span(b"a", 3, 20), _span(b"b", 40, 5)])
    assert mm.block_key(0, 16) == b"a" * 16
    assert mm.block_key(16, 32) == b"a" * 16
    assert mm.block_key(32, 40) == b""
    assert mm.block_key(32, 48) == b"b" * 16

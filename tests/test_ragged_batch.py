"""A ragged batch on a paged cache gives each sequence the logits it gets alone.

A test-only driver does what the runtime will: allocate a paged cache, hand out
blocks, and run steps that mix one sequence's prefill (in two chunks) with the others'
decode tokens, as one flat [1, T] batch.
"""
import pytest
import torch

import trtllm
from tests.models.checkpoints import write_checkpoint
from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context

BLOCK = 4


class Driver:
    def __init__(self, compiled, num_blocks=64, max_tokens=64, max_seqs=8):
        spec = compiled.attention
        self.compiled = compiled
        self.cache = PagedKVCache.allocate(spec.num_layers, num_blocks, BLOCK, spec.num_kv_heads,
                                           spec.head_dim, spec.dtype, "cpu")
        self.cache.k.normal_()  # stale garbage in free blocks must never be read
        self.cache.v.normal_()
        self.meta = AttentionMetadata(max_tokens, max_seqs, 16, "cpu")
        self.free = list(range(num_blocks))[::-1]
        self.free = self.free[1::2] + self.free[::2]  # non-contiguous block tables
        self.tables: dict[int, list[int]] = {}
        self.done: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """chunks: sequence id -> its new token ids this step. Returns their logits."""
        ids, pos, qlens, slens, tables = [], [], [], [], []
        for sid, toks in chunks.items():
            start = self.done.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < start + len(toks):
                table.append(self.free.pop())
            ids += toks
            pos += range(start, start + len(toks))
            qlens.append(len(toks))
            slens.append(start + len(toks))
            tables.append(table)
            self.done[sid] = start + len(toks)
        self.meta.fill(qlens, slens, tables, BLOCK)
        with attention_context(self.cache, self.meta):
            logits = self.compiled(torch.tensor([ids]), torch.tensor([pos]))[0]
        out, at = {}, 0
        for sid, n in zip(chunks, qlens):
            out[sid] = logits[at: at + n]
            at += n
        return out


@pytest.mark.parametrize("family", ["llama31", "qwen3", "mistral_swa"])
def test_ragged_prefill_and_decode_match_each_sequence_alone(tmp_path, family):
    model = trtllm.load_model(write_checkpoint(family, tmp_path), dtype=torch.float32, device="cpu")
    compiled = trtllm.compile(model)
    g = torch.Generator().manual_seed(1)
    prompts = {0: torch.randint(0, 128, (11,), generator=g).tolist(),
               1: torch.randint(0, 128, (3,), generator=g).tolist(),
               2: torch.randint(0, 128, (7,), generator=g).tolist()}
    driver = Driver(compiled)
    got = {sid: [] for sid in prompts}
    # step 1: seq 0's first chunk (chunked prefill) + seq 1's whole prompt
    for sid, lg in driver.step({0: prompts[0][:6], 1: prompts[1]}).items():
        got[sid].append(lg)
    # step 2: seq 0's second chunk + seq 2's prompt + seq 1 decodes
    extra = {sid: torch.randint(0, 128, (4,), generator=g).tolist() for sid in prompts}
    for sid, lg in driver.step({0: prompts[0][6:], 2: prompts[2], 1: extra[1][:1]}).items():
        got[sid].append(lg)
    # steps 3..5: everyone decodes (sequence 0 and 2 catch up)
    for i in range(3):
        chunk = {0: extra[0][i:i + 1], 1: extra[1][i + 1:i + 2], 2: extra[2][i:i + 1]}
        for sid, lg in driver.step(chunk).items():
            got[sid].append(lg)
    for sid in prompts:
        fed = driver.done[sid]
        full = (prompts[sid] + extra[sid])[:fed]
        with torch.no_grad():
            alone = model(torch.tensor([full]), torch.arange(fed)[None])[0]
        ours = torch.cat(got[sid])
        assert ours.shape == alone.shape
        err = ((ours - alone).norm() / alone.norm()).item()
        assert err < 1e-4, f"sequence {sid}: relative error {err}"

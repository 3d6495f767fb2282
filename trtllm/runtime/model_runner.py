"""`ModelRunner`: one engine step's tokens in, the logits to sample out.

It owns the paged KV cache (of the model's dtype, or FP8 / INT8 with its scales:
runtime/kv_cache_quant.py) and the fixed-address input buffers (token ids, positions,
attention metadata: see attention_context.py). A step's scheduled sequences become
one flat ragged batch `[1, T]`; the compiled model computes logits only for the last
token of each sequence whose chunk reaches its end (the ones the sampler needs), and,
after those, for the prompt positions of sequences that ask for prompt logprobs
(runtime/prompt_logprobs.py; such a step never replays a CUDA graph).

A speculating sequence's chunk is its last known token followed by its draft tokens
(`seq.draft_token_ids`, runtime/speculative): logits come for all k + 1 positions
(`LaunchedStep.num_rows`). Such verify steps run the compiled model directly, unless
`cuda_graphs.capture_verify(k + 1, sizes)` captured graphs for b sequences of k + 1 tokens each
(runtime/cuda_graphs.py; the speculative configs' `verify_cuda_graphs`, on by default on a GPU)
and every sequence of the step verifies exactly k drafts.
With LoRA (`adapters`, runtime/adapters.py), each step also writes each token's adapter slot
(-1: none) into the fixed-address `LoraSlots.slot_ids` the graphs read (trtllm/lora_slots.py),
padding tokens -1, by one more copy out of the same pinned staging. A step in which no token
has an adapter runs inside `no_adapters()` (kernels/linear_lora.py) (the fused LoRA linears launch the base
linear alone), by the decode graphs captured that way where one fits. Prefill graphs are
captured once, with the adapters' kernels: they serve steps with and without adapters (a
token of slot -1 costs the kernels a slot read and, in the expand, a copy of its row).
With images (`multimodal`, runtime/multimodal_stager.py), each step first stages the image
features its chunks reach (encoded once per image) into the fixed-address buffers the graphs'
`trtllm.splice_embeddings` reads (trtllm/multimodal_context.py); a step without image tokens
leaves them as they are, every row -1.

On a GPU, pure-decode steps replay CUDA graphs captured for batch sizes 1, 2, 4, 8,
16, ... up to max_num_seqs (a step pads to the next captured size: padded tokens
write no cache slot and belong to no sequence), and steps of several tokens a sequence
of at most CudaGraphConfig.max_prefill_tokens tokens replay graphs captured for token
buckets (their capture and replay are runtime/cuda_graphs.py; with latent attention only
buckets of at most ABSORBED_MAX_QUERY_LEN tokens). Other steps (longer ones, prompt
logprobs) run the compiled model directly.

A step is launched, not waited for: `execute` queues its GPU work and returns a
`LaunchedStep`; its results are read after `LaunchedStep.wait()`. `execute_ahead`
launches the decode step after a decode-graph step whose tokens are still on the GPU:
its input ids are that step's greedy picks, gathered on the device, so the host can
build and queue step n+1 while step n runs (the engine's overlap scheduler). Host
buffers that feed the GPU (the pinned staging of ids/positions and the attention
metadata) are rewritten only once the previous step's copies out of them have run
(`_inputs_copied`); the greedy picks come back into one of two pinned buffers, by
turns, so step n+1's copy never overwrites step n's before the host reads it.
"""
from __future__ import annotations

import contextlib
import math

import torch

from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context
from trtllm.compile import CompiledModel
from trtllm.config import CudaGraphConfig
from trtllm.hidden_states import HiddenStatesContext, hidden_states_context
from trtllm.kernels.linear_lora import no_adapters
from trtllm.mla_attention import ABSORBED_MAX_QUERY_LEN
from trtllm.multimodal_context import multimodal_context
from trtllm.runtime.cuda_graphs import CudaGraphs, decode_batch_sizes, prefill_token_sizes
from trtllm.runtime.kv_cache_quant import KvCacheQuant
from trtllm.runtime.launched_step import LaunchedStep
from trtllm.runtime.multimodal_stager import MultimodalStager
from trtllm.runtime.prompt_logprobs import chunk_span
from trtllm.runtime.sequence import Sequence


class ModelRunner:
    def __init__(self, compiled: CompiledModel, *, num_blocks: int, block_size: int,
                 max_num_tokens: int, max_num_seqs: int, max_model_len: int,
                 enable_cuda_graph: bool = True, kv_quant: KvCacheQuant | None = None, adapters=None,
                 multimodal: MultimodalStager | None = None, mrope=None,
                 cuda_graph_config: CudaGraphConfig | None = None,
                 hidden_states: HiddenStatesContext | None = None, pick_map: torch.Tensor | None = None):
        spec = compiled.attention
        self.compiled, self.device = compiled, compiled.device
        self.block_size, self.max_model_len = block_size, max_model_len
        self.kv_quant = kv_quant  # None: the cache holds the model's dtype
        self.cache = PagedKVCache.allocate(spec.num_layers, num_blocks, block_size, spec.num_kv_heads,
                                           spec.head_dim, kv_quant.dtype if kv_quant else spec.dtype, self.device,
                                           kv_quant.scales if kv_quant else None, values=not spec.latent)
        self.meta = AttentionMetadata(max_num_tokens, max_num_seqs, math.ceil(max_model_len / block_size),
                                      self.device)
        # token ids, positions and logits rows: one device buffer, filled from one pinned
        # host buffer by one copy per step; row 3: LoRA slots per token (copied to slot_ids)
        self.adapters = adapters
        self.multimodal = multimodal  # image features staged per step (runtime/multimodal_stager.py), None: text only
        self.mrope = mrope  # 3-axis positions staged per step (runtime/mrope_positions.py), None: 1-D positions
        # EAGLE-3: the stores the graphs' stash and draft-input ops use (trtllm/hidden_states.py), None: none
        self.hidden_states = hidden_states
        # decode graphs' greedy picks mapped through it ([V'] -> token id: an EAGLE-3 head's draft
        # vocabulary), None: the argmax is the token id
        self.pick_map = pick_map
        self._inputs = torch.zeros((3, max_num_tokens), dtype=torch.long, device=self.device)
        self._staging = torch.zeros((4 if adapters is not None else 3, max_num_tokens), dtype=torch.long,
                                    pin_memory=self.device.type == "cuda")
        self._staging_np = self._staging.numpy()
        self.input_ids, self.positions, self.logits_indices = self._inputs
        cuda = self.device.type == "cuda"
        self._done_events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else [None, None]
        self._inputs_copied = torch.cuda.Event() if cuda else None
        self._turn = 0  # which of two host buffers / done events this step uses (see the docstring)
        self.cuda_graphs = CudaGraphs(self)  # decode and verify graphs: runtime/cuda_graphs.py
        if enable_cuda_graph and self.device.type == "cuda":
            config = cuda_graph_config or CudaGraphConfig()
            self.cuda_graphs.padding = config.enable_padding
            self.cuda_graphs.capture_decode(decode_batch_sizes(config, max_num_seqs))
            if self.prefill_graphs_serve():
                # a step of T tokens has sequences of at most max_model_len tokens
                most = min(config.max_prefill_tokens, max_num_tokens, max_num_seqs * max_model_len)
                if self.compiled.attention.latent:  # only steps the MLA op attends on the device
                    most = min(most, ABSORBED_MAX_QUERY_LEN)
                self.cuda_graphs.capture_prefill(prefill_token_sizes(most))
                self.cuda_graphs.warm_short_steps()

    def prefill_graphs_serve(self) -> bool:
        """Whether prefill graphs can run this model's steps: not under parallelism (no
        graphs). Per-token state is refilled before each replay, as for decode graphs: `execute`
        chooses the graph first and stages LoRA slots and M-RoPE positions up to its size.
        Image rows they read: `execute` stages them into fixed buffers before any replay, and
        the rows past the step's tokens hold -1 (trtllm/multimodal_context.py). Latent
        attention: graphs of at most ABSORBED_MAX_QUERY_LEN tokens, the steps the MLA op
        attends on the device (verify steps, an MTP layer's catch-ups); longer ones expand
        per sequence on the host's lengths (trtllm/mla_attention.py)."""
        compiled = self.compiled
        return getattr(compiled, "tensor_parallel", None) is None

    @contextlib.contextmanager
    def graph_inputs(self):
        """What the graph's ops read besides the KV cache: the step's staged image features
        (the splice op's) and the hidden-state stores (EAGLE-3's stash and draft-input ops)."""
        with multimodal_context(self.multimodal.embeddings if self.multimodal is not None else None), \
                hidden_states_context(self.hidden_states):
            yield

    def _flat_batch(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) [1, num_tokens] of the step, contiguous views of the input
        buffer. Sliced then unsqueezed: `buffer[None, :n]` would have stride max_num_tokens, and
        dynamo guards the first graph's (the KV profiling call's, contiguous) stride against its
        size: the first prefill then compiled again (H200, Llama-3.1-8B: 28.9 s after startup)."""
        if self.mrope is not None:  # M-RoPE: positions [3, 1, num_tokens]
            return self.input_ids[:num_tokens][None], self.mrope.positions(num_tokens)
        return self.input_ids[:num_tokens][None], self.positions[:num_tokens][None]

    # -- a step ------------------------------------------------------------------------
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> LaunchedStep:
        """Launch one step: the sequences to sample and (once done) their logits [N, V]."""
        self._wait_inputs_copied()
        if self.multimodal is not None:  # before the graph replays or the model runs: it reads them
            self.multimodal.stage(scheduled)
        ids, positions, query_lens, seq_lens, tables, sample_rows, to_sample = [], [], [], [], [], [], []
        prompt_rows, spans, num_rows = [], [], []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            end = start + n
            known = seq.num_tokens
            if n == 1:  # decode: one token, no list built for it
                ids.append(seq.token_at(start))
                positions.append(start)
            elif end > known:  # verify (runtime/speculative): the last known token, then drafts
                ids += seq.token_slice(start, known)
                ids += seq.draft_token_ids[:end - known]
                positions += range(start, end)
            else:
                ids += seq.token_slice(start, end)
                positions += range(start, end)
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(seq.block_table)
            if end == known:  # the chunk reaches the last known token
                sample_rows.append(len(ids) - 1)
                to_sample.append(seq)
                num_rows.append(1)
            elif end > known:  # and k drafts: the logits after each of the k + 1 tokens
                sample_rows += range(len(ids) - (end - known) - 1, len(ids))
                to_sample.append(seq)
                num_rows.append(end - known + 1)
            if start < seq.prompt_logprob_end:  # prompt logprobs asked: this chunk's positions
                span = chunk_span(seq, start, end)
                if span is not None:
                    row0 = len(ids) - n - start  # the flat row of position p is row0 + p
                    prompt_rows += range(row0 + span.start, row0 + span.end)
                    spans.append(span)
        num_tokens, num_sampled = len(ids), len(sample_rows)
        self.meta.fill(query_lens, seq_lens, tables, self.block_size)
        graphs = self.cuda_graphs
        verify = num_rows if num_sampled != len(to_sample) else None
        # the graph that runs the step, if one does, chosen first: its padded size is what
        # the per-token side inputs (M-RoPE rows, LoRA slots) are staged up to
        decode_size = verify_size = prefill_size = None
        if not spans:
            decode_size = graphs.decode_size(num_tokens, len(scheduled), sample_rows)
            if decode_size is None and verify is not None and graphs.verify:
                verify_size = graphs.verify_size(query_lens, verify)
            if decode_size is None and verify_size is None and graphs.prefill:
                prefill_size = graphs.prefill_size(num_tokens, num_sampled)
        padded = decode_size or (verify_size and verify_size * graphs.verify_len) or prefill_size or num_tokens
        if self.mrope is not None:
            self.mrope.stage([(seq, seq.num_computed_tokens, n) for seq, n in scheduled], padded)
        adapters = self.adapters is not None and self._stage_lora_slots(scheduled, padded)
        if decode_size is not None:
            return graphs.replay(decode_size, ids, positions, range(num_sampled), scheduled, to_sample,
                                 adapters=adapters)
        if verify_size is not None:
            return graphs.replay_verify(verify_size, ids, positions, scheduled, to_sample, verify)
        if prefill_size is not None:
            return graphs.replay_prefill(prefill_size, ids, positions, sample_rows, scheduled, to_sample, verify)
        self._copy_inputs(ids, positions, sample_rows + prompt_rows)
        rows = self.logits_indices[: num_sampled + len(prompt_rows)]
        with attention_context(self.cache, self.meta), self.graph_inputs(), \
                no_adapters(self.adapters is not None and not adapters):
            logits = self.compiled(*self._flat_batch(num_tokens), rows)
        done = self._step_launched()
        # a pipeline's first stage: the logits arrive from the last stage later (trtllm/parallel)
        pending = self.compiled.take_pending() if isinstance(self.compiled, CompiledModel) else None
        done = pending or done
        if not spans:
            return LaunchedStep(scheduled, to_sample, logits, None, None, done, num_rows=verify)
        return LaunchedStep(scheduled, to_sample, logits[:num_sampled], None, None, done,
                            spans, logits[num_sampled:], num_rows=verify)

    def execute_ahead(self, previous: LaunchedStep, seqs: list[Sequence], rows: list[int],
                      tokens: torch.Tensor | None = None) -> LaunchedStep | None:
        """Launch the decode step after `previous` (a decode-graph step, still running or
        queued) before its tokens reach the host: `seqs[i]` computes the token `previous`
        picks at row `rows[i]`, at position `seq.num_tokens` (where that token will go),
        its context one longer. Each sequence's blocks must already cover that position.
        `tokens`: the device tensor `previous`'s tokens are in, by row (its sampler's output,
        queued on the stream before this); default the graph's own greedy picks. None if no
        captured graph fits."""
        if tokens is None and previous.device_picks is None:
            raise ValueError("execute_ahead follows a decode-graph step (its picks are on the device) "
                             "or takes the previous step's tokens on the device")
        m = len(seqs)
        size = self.cuda_graphs.decode_size(m, m, [])
        if size is None:
            return None
        self._wait_inputs_copied()
        if self.multimodal is not None:  # decode tokens: no image rows
            self.multimodal.reset()
        positions = [seq.num_tokens for seq in seqs]
        if self.mrope is not None:
            self.mrope.stage([(seq, p, 1) for seq, p in zip(seqs, positions)], size)
        scheduled = [(seq, 1) for seq in seqs]
        adapters = self.adapters is not None and self._stage_lora_slots(scheduled, size)
        self.meta.fill([1] * m, [p + 1 for p in positions], [seq.block_table for seq in seqs], self.block_size)
        gather = previous.device_picks[0] if tokens is None else tokens
        return self.cuda_graphs.replay(size, [], positions, rows, scheduled, seqs, gather, adapters=adapters)

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy-on-write (block_manager.py): each (source, copy, tokens) block's K/V of its first
        `tokens` positions, every layer, into the copy, queued before the step that writes it
        (PagedKVCache.copy_blocks)."""
        assert not {c[1] for c in copies} & {c[0] for c in copies}, f"a copy's block is another's source: {copies}"
        # a count past the block would copy into the next block's rows: never asked of the kernel
        assert all(0 < c[2] <= self.block_size for c in copies), f"a copy's token count outside 1..{self.block_size}: {copies}"
        self.cache.copy_blocks(copies)
        tp = getattr(self.compiled, "tensor_parallel", None)
        if tp is not None and tp.workers is not None:  # every rank's cache holds its heads of these blocks
            tp.workers.copy_blocks(copies)

    def _step_launched(self) -> torch.cuda.Event | None:
        """The event that marks this step done; the next step uses the other buffers."""
        done = self._done_events[self._turn]
        if done is not None:
            done.record()
        self._turn ^= 1
        return done

    def _wait_inputs_copied(self) -> None:
        """The pinned staging and metadata buffers are about to be rewritten: the last
        step's host-to-device copies out of them must have run. (Right after a launch they
        may still be queued behind the step before; usually they are done.)"""
        if self._inputs_copied is not None:
            self._inputs_copied.synchronize()

    def _copy_inputs(self, ids: list[int], positions: list[int], rows: list[int]) -> None:
        n = len(ids)
        self._stage(ids, positions, rows, n)
        self._inputs[:, :n].copy_(self._staging[:3, :n], non_blocking=True)
        if self.adapters is not None:
            self.adapters.slots.slot_ids[:n].copy_(self._staging[3, :n], non_blocking=True)
        if self._inputs_copied is not None:
            self._inputs_copied.record()

    def _stage_lora_slots(self, scheduled: list[tuple[Sequence, int]], n: int) -> bool:
        """Each token's LoRA slot into staging row 3 (-1 up to `n`: padding, the base); the
        copy to the device goes with the step's other inputs. Staged before `_stage`, which
        leaves row 3 alone. Whether any token has an adapter (else the step runs without
        the adapters' kernels: no_adapters, kernels/linear_lora.py)."""
        host, t, any_adapter = self._staging_np[3], 0, False
        host[:n] = -1
        for seq, count in scheduled:
            slot = self.adapters.slot(seq)
            host[t: t + count] = slot
            any_adapter |= slot >= 0
            t += count
        return any_adapter

    def _stage(self, ids: list[int], positions: list[int], rows, n: int) -> None:
        """Token ids, positions and logits rows into the pinned staging buffer, zeros up
        to `n` (a graph's padding tokens)."""
        host = self._staging_np
        host[:3, :n] = 0
        host[0, : len(ids)] = ids
        host[1, : len(positions)] = positions
        host[2, : len(rows)] = rows

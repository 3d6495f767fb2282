"""A request's sequences as the engine runs them: its n completions (best_of of them sampled), or
a beam search's beams (runtime/beams.py `BeamGroup`), each with its sampler seed, its cache salt
(runtime/block_manager.chain_root), its perf recorder (`return_perf_metrics`,
runtime/request_perf.py) and, on the first, the prompt positions it scores (prompt logprobs,
context logits: runtime/prompt_logprobs.py).

    seqs, group = request_sequences(request_id, prompt_token_ids, params, eos_token_ids, max_seq_len,
                                    tokenizer, block_size, lora_request, multimodal, cache_salt)
"""
from __future__ import annotations

from trtllm.runtime.beams import BeamGroup
from trtllm.runtime.engine_limits import check_cache_salt
from trtllm.runtime.request_perf import PerfRecorder
from trtllm.runtime.sampler import draw_seed
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams


def request_sequences(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      eos_token_ids: list[int], max_seq_len: int, tokenizer, block_size: int, lora_request=None,
                      multimodal=None, cache_salt: str | None = None) -> tuple[list[Sequence], BeamGroup | None]:
    """The request's sequences, and its beam group (None without beam search)."""
    group = BeamGroup(request_id, prompt_token_ids, params, eos_token_ids, max_seq_len, tokenizer, lora_request,
                      multimodal) if params.is_beam_search else None
    seqs = group.beams if group is not None else \
        [Sequence(request_id, list(prompt_token_ids), params, index=i, lora_request=lora_request,
                  multimodal=multimodal) for i in range(params.num_sequences)]
    salt = check_cache_salt(cache_salt)
    for seq in seqs:
        seq.seed = params.seed if params.seed is not None else draw_seed()
        seq.perf = PerfRecorder(block_size) if params.return_perf_metrics else None
        seq.cache_salt = salt
    if params.prompt_logprobs is not None or params.return_context_logits:  # the first sequence scores
        seqs[0].prompt_logprob_end = len(prompt_token_ids) - 1             # the prompt for all n
    return seqs, group

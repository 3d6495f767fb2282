"""Speculative decoding configs, as TensorRT-LLM spells them (and the manual's spelling).

    LLM(model, speculative_config=NGramDecodingConfig(max_draft_len=4, max_matching_ngram_size=3))
    LLM(model, speculative_config=DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir="draft/"))
    LLM(model, speculative_decoding_config=SpeculativeDecodingConfig(draft_model="draft/", draft_tokens=4))

`SpeculativeDecodingConfig` is the same thing as `DraftTargetDecodingConfig`
(`as_draft_target()`); `speculative_model_dir` / `draft_model` may also be an `nn.Module`
the engine can run.

    LLM(model, speculative_config=EagleDecodingConfig(max_draft_len=4, speculative_model_dir="eagle3/"))

takes an EAGLE-3 head in the published layout (models/eagle3.py).

    LLM("DeepSeek-V3/", speculative_config=MTPDecodingConfig(num_nextn_predict_layers=3))

drafts with the checkpoint's own multi-token-prediction layer (models/deepseek_mtp.py),
reused for each draft token as TensorRT-LLM's default "MTP Eagle" does: there
num_nextn_predict_layers is the draft length (TensorRT-LLM 1.x); `max_draft_len` (its later
spelling) says the same and wins when both are given.

`verify_cuda_graphs` (ours, not TensorRT-LLM's): CUDA graphs for verify steps in which every
sequence verifies max_draft_len drafts (CudaGraphs.capture_verify, runtime/cuda_graphs.py).
None, the default, captures them wherever the engine can (a GPU with CUDA graphs on); True
asks for them (refused by name where they cannot be made);
False runs verify steps eagerly. On the H200 (2026-12-03, bench/RESULTS.md) they took an 8B
draft-model batch-1 step from 24.7 ms to 10.8 ms: 0.44x -> 1.95x the plain target.
"""
from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator

from trtllm.validated_config import ConfigError, ValidatedConfig

_VERIFY_GRAPHS = ("CUDA graphs for verify steps of max_draft_len drafts: None (default) wherever the engine can "
                  "capture them, True required, False off")
_NGRAM_POOL_REFUSED = dict(is_keep_all="keeping every match of a pattern is not implemented",
                           is_use_oldest="the oldest match is not implemented",
                           is_public_pool="a pool shared by requests is not implemented")
_ARBITRARY = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                        arbitrary_types_allowed=True)


class NGramDecodingConfig(ValidatedConfig):
    """Prompt lookup: the draft is what followed the latest earlier occurrence of the
    sequence's last n tokens (n from max_matching_ngram_size down to 1) in its own prompt
    and output. No model."""
    max_draft_len: int = Field(4, ge=1, le=32, description="draft tokens proposed per step at most")
    max_matching_ngram_size: int = Field(3, ge=1, le=64, description="longest suffix looked up")
    verify_cuda_graphs: bool | None = Field(None, description=_VERIFY_GRAPHS)
    # TensorRT-LLM's pool options, taken at what this lookup does (its later releases refuse True too)
    is_keep_all: bool = Field(False, description="False: one match a pattern, the latest (True is not implemented)")
    is_use_oldest: bool = Field(False, description="False: the newest match (True is not implemented)")
    is_public_pool: bool = Field(False, description="False: each request looks up its own tokens (a pool shared by "
                                                    "requests is not implemented)")

    @field_validator("is_keep_all", "is_use_oldest", "is_public_pool")
    @classmethod
    def _pool_as_implemented(cls, v, info):
        if v:
            raise ValueError(_NGRAM_POOL_REFUSED[info.field_name] + "; the lookup takes the latest match in the "
                             "request's own tokens (only false is taken)")
        return v


class DraftTargetDecodingConfig(ValidatedConfig):
    """A separate draft model (same tokenizer / vocabulary), with its own KV pool, proposes
    max_draft_len tokens a step; the target verifies them in one forward pass."""
    model_config = _ARBITRARY
    max_draft_len: int = Field(4, ge=1, le=32, description="draft tokens proposed per step at most")
    speculative_model_dir: Any = Field(..., description="the draft model: a checkpoint directory or an nn.Module")
    verify_cuda_graphs: bool | None = Field(None, description=_VERIFY_GRAPHS)


class SpeculativeDecodingConfig(ValidatedConfig):
    """The manual's spelling of `DraftTargetDecodingConfig`."""
    model_config = _ARBITRARY
    draft_model: Any = Field(..., description="the draft model: a checkpoint directory or an nn.Module")
    draft_tokens: int = Field(4, ge=1, le=32, description="draft tokens proposed per step at most")
    verify_cuda_graphs: bool | None = Field(None, description=_VERIFY_GRAPHS)

    def as_draft_target(self) -> DraftTargetDecodingConfig:
        return DraftTargetDecodingConfig(max_draft_len=self.draft_tokens, speculative_model_dir=self.draft_model,
                                         verify_cuda_graphs=self.verify_cuda_graphs)


class EagleDecodingConfig(ValidatedConfig):
    """An EAGLE-3 head (models/eagle3.py) proposes max_draft_len tokens a step from the
    target's own hidden states (runtime/speculative/eagle3.py); the target verifies them."""
    model_config = _ARBITRARY
    max_draft_len: int = Field(4, ge=1, le=32, description="draft tokens proposed per step at most")
    speculative_model_dir: Any = Field(None, description="the EAGLE-3 head: a checkpoint directory or an "
                                                         "Eagle3Draft module")
    eagle3_one_model: bool = Field(True, description="the head runs in the target's engine (False is refused)")
    eagle3_layers_to_capture: set[int] | None = Field(
        None, description="the target layers whose output the head reads (default: the head's config, else "
                          "1, L/2 - 1, L - 4)")
    verify_cuda_graphs: bool | None = Field(None, description=_VERIFY_GRAPHS)


class MTPDecodingConfig(ValidatedConfig):
    """DeepSeek-V3's multi-token-prediction layer proposes the draft tokens from the target's
    last hidden state (models/deepseek_mtp.py, runtime/speculative/eagle3.py)."""
    model_config = _ARBITRARY
    num_nextn_predict_layers: int = Field(1, ge=1, le=32, description="draft tokens a step (TensorRT-LLM 1.x: MTP "
                                                                      "Eagle runs the one MTP layer this many times)")
    max_draft_len: int | None = Field(None, ge=1, le=32, description="draft tokens a step (the later spelling; "
                                                                     "wins over num_nextn_predict_layers)")
    use_mtp_vanilla: bool = Field(False, description="a different MTP layer each draft step (True is refused)")
    mtp_eagle_one_model: bool = Field(True, description="the MTP layer runs in the target's engine (False is refused)")
    use_relaxed_acceptance_for_thinking: bool = Field(False, description="accept drafts among the target's top "
                                                                         "candidates (True is refused: not exact)")
    relaxed_topk: int = Field(1, ge=1)
    relaxed_delta: float = Field(0.0, ge=0.0)
    speculative_model_dir: Any = Field(None, description="where the MTP layer's tensors are (default: the target's "
                                                         "checkpoint directory) or an MTPDraft module")
    verify_cuda_graphs: bool | None = Field(None, description=_VERIFY_GRAPHS)

    @property
    def draft_len(self) -> int:
        return self.max_draft_len if self.max_draft_len is not None else self.num_nextn_predict_layers


SPECULATIVE_CONFIGS = (NGramDecodingConfig, DraftTargetDecodingConfig, SpeculativeDecodingConfig,
                       EagleDecodingConfig, MTPDecodingConfig)


SPECULATIVE_KINDS = ("ngram", "draft_target", "eagle3", "mtp")  # the commands' --speculative choices
DEFAULT_MAX_DRAFT_LEN, DEFAULT_MAX_MATCHING_NGRAM_SIZE = 4, 3  # theirs, when --max_draft_len / ... is not given


def speculative_config_from_options(kind: str | None, max_draft_len: int | None, max_matching_ngram_size: int | None,
                                    speculative_model_dir: str | None):
    """The commands' --speculative (SPECULATIVE_KINDS) and its options as a config (None: off);
    mtp reads its layer from the model's checkpoint (or --speculative_model_dir). An option None
    was not given: its default (4 draft tokens, n-grams of 3); one given that `kind` never reads
    is refused by name (it was silently unused)."""
    if kind is not None and kind not in SPECULATIVE_KINDS:
        raise ConfigError("--speculative", [(None, None, f"must be one of {', '.join(SPECULATIVE_KINDS)}, "
                                                         f"got {kind!r}")])
    readers = (("--max_draft_len", max_draft_len, SPECULATIVE_KINDS),
               ("--max_matching_ngram_size", max_matching_ngram_size, ("ngram",)),
               ("--speculative_model_dir", speculative_model_dir, ("draft_target", "eagle3", "mtp")))
    for option, value, kinds in readers:
        if value is not None and kind not in kinds:
            kinds_ = ", ".join(kinds[:-1]) + f" or {kinds[-1]}" if len(kinds) > 1 else kinds[0]
            raise ConfigError(option, [(None, None, f"is for --speculative {kinds_}"
                                        + (f", not {kind}" if kind else "; no --speculative given"))])
    max_draft_len = DEFAULT_MAX_DRAFT_LEN if max_draft_len is None else max_draft_len
    if max_matching_ngram_size is None:
        max_matching_ngram_size = DEFAULT_MAX_MATCHING_NGRAM_SIZE
    if kind is None:
        return None
    if kind == "ngram":
        return NGramDecodingConfig(max_draft_len=max_draft_len, max_matching_ngram_size=max_matching_ngram_size)
    if kind == "mtp":
        return MTPDecodingConfig(max_draft_len=max_draft_len, speculative_model_dir=speculative_model_dir)
    if speculative_model_dir is None:
        what = "the draft's checkpoint" if kind == "draft_target" else "the EAGLE-3 head's directory"
        raise ConfigError("--speculative", [(None, None, f"{kind} needs --speculative_model_dir ({what})")])
    if kind == "eagle3":
        return EagleDecodingConfig(max_draft_len=max_draft_len, speculative_model_dir=speculative_model_dir)
    return DraftTargetDecodingConfig(max_draft_len=max_draft_len, speculative_model_dir=speculative_model_dir)

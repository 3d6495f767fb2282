"""TensorRT-LLM's spellings of `LLM`'s arguments, as this engine takes them: CUDA graphs turned
off by `cuda_graph_config=None` or `enable_cuda_graph=False`; `trust_remote_code` and `backend` as
far as they hold here; a rendered chat's sampling params (no second BOS)."""
from __future__ import annotations

from trtllm.config import CudaGraphConfig
from trtllm.sampling_params import SamplingParams

DEFAULT_CUDA_GRAPHS = object()  # LLM(cuda_graph_config=) not given: CudaGraphConfig's defaults


def cuda_graph_options(enable_cuda_graph: bool, cuda_graph_config) -> tuple[bool, CudaGraphConfig | None]:
    """(enable_cuda_graph, config) from LLM's two spellings: TensorRT-LLM turns graphs off with
    cuda_graph_config=None, ours with enable_cuda_graph=False; not given: the defaults (None)."""
    if cuda_graph_config is DEFAULT_CUDA_GRAPHS:
        return enable_cuda_graph, None
    if cuda_graph_config is None:
        return False, None
    if not isinstance(cuda_graph_config, CudaGraphConfig):
        raise TypeError(f"cuda_graph_config must be a CudaGraphConfig or None, got {type(cuda_graph_config).__name__}")
    if not enable_cuda_graph:
        raise ValueError("enable_cuda_graph=False with a cuda_graph_config: give one or the other")
    return True, cuda_graph_config


def chat_params(params: SamplingParams | None):
    """A rendered chat's text holds the template's own special tokens (Llama 3's BOS): it is
    tokenized without adding them again (the server's rule, and vLLM's), unless the params set
    add_special_tokens themselves."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams) or "add_special_tokens" in params.model_fields_set:
        return params  # (anything else: _prepare names its type)
    return params.model_copy(update={"add_special_tokens": False})


def check_tensorrt_llm_args(trust_remote_code: bool, backend: str | None) -> None:
    """No checkpoint code is run here, and the one backend is PyTorch's: say so by name."""
    if trust_remote_code:
        raise ValueError("trust_remote_code=True is not supported: trtllm runs no code from a checkpoint "
                         "(its model files, or the transformers module of the architecture)")
    if backend not in (None, "pytorch"):
        raise ValueError(f"backend={backend!r}: trtllm's one backend is 'pytorch' (no TensorRT engines)")

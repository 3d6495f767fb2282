"""TensorRT-LLM's spellings of `LLM`'s arguments, as this engine takes them: CUDA graphs turned
off by `cuda_graph_config=None` or `enable_cuda_graph=False`; `trust_remote_code`, `backend`,
`guided_decoding_backend`, `enable_lora`, `tokenizer_mode`, `revision`, `tokenizer_revision` and
`load_format` as far as they hold here (each other value refused by name); a rendered chat's
sampling params (no second BOS)."""
from __future__ import annotations

from trtllm.config import CudaGraphConfig, LoraConfig
from trtllm.runtime.iteration_stats import DEFAULT_MAX_ITERATIONS
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


def check_tensorrt_llm_args(trust_remote_code: bool, backend: str | None, guided_decoding_backend: str | None = None,
                            tokenizer_mode: str = "auto", revision: str | None = None,
                            tokenizer_revision: str | None = None, load_format: str = "auto") -> None:
    """No checkpoint code is run here, the one backend is PyTorch's, structured output is always
    xgrammar's (TensorRT-LLM needs guided_decoding_backend set to take it at all; here it is on),
    tokenizers are transformers' fast ones, and checkpoints are local directories read whole: say so
    by name for any other value."""
    if trust_remote_code:
        raise ValueError("trust_remote_code=True is not supported: trtllm runs no code from a checkpoint "
                         "(its model files, or the transformers module of the architecture)")
    if backend not in (None, "pytorch"):
        raise ValueError(f"backend={backend!r}: trtllm's one backend is 'pytorch' (no TensorRT engines)")
    if guided_decoding_backend not in (None, "xgrammar"):
        raise ValueError(f"guided_decoding_backend={guided_decoding_backend!r}: trtllm's structured output is "
                         "xgrammar's (always on: None and 'xgrammar' are the same)")
    if tokenizer_mode != "auto":
        raise ValueError(f"tokenizer_mode={tokenizer_mode!r}: trtllm loads the checkpoint's fast tokenizer "
                         "(tokenizer.json) only; 'auto' is the one mode")
    for name, value in (("revision", revision), ("tokenizer_revision", tokenizer_revision)):
        if value is not None:
            raise ValueError(f"{name}={value!r}: trtllm reads local checkpoint directories only (no hub, "
                             "so no revisions); check out the revision into a directory and give its path")
    if load_format not in ("auto", "AUTO"):
        raise ValueError(f"load_format={load_format!r}: trtllm loads the checkpoint's weights ('auto'); for random "
                         "weights of a model's shapes, build the module yourself and pass it as model=")


def lora_config_of(enable_lora: bool, lora_config: LoraConfig | None) -> LoraConfig | None:
    """TensorRT-LLM's `enable_lora=True` alone: adapters with LoraConfig's defaults (a lora_config
    turns LoRA on by itself)."""
    if not isinstance(enable_lora, bool):
        raise TypeError(f"enable_lora must be True or False, got {enable_lora!r}")
    return LoraConfig() if enable_lora and lora_config is None else lora_config


def iteration_stats_option(enable: bool, max_iterations: int | None) -> int | None:
    """TensorRT-LLM's enable_iter_perf_stats / iter_stats_max_iterations: how many steps' stats
    `LLM.get_stats()` keeps (runtime/iteration_stats.py), None: off. Checked before loading."""
    if not isinstance(enable, bool):
        raise TypeError(f"enable_iter_perf_stats must be True or False, got {enable!r}")
    if max_iterations is not None and (isinstance(max_iterations, bool) or not isinstance(max_iterations, int)
                                       or max_iterations < 1):
        raise ValueError(f"iter_stats_max_iterations must be an integer >= 1, got {max_iterations!r}")
    if not enable and max_iterations is not None:
        raise ValueError("iter_stats_max_iterations needs enable_iter_perf_stats=True")
    return (max_iterations or DEFAULT_MAX_ITERATIONS) if enable else None


def per_prompt(value, n: int, name: str) -> list:
    """generate's one-for-all or one-per-prompt argument as a list of `n` (ValueError naming a list
    of another length)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} prompts")
    return values

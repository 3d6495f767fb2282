"""trtllm: a kernel-first LLM inference compiler and runtime.

    from trtllm import LLM, SamplingParams
    llm = LLM()                                  # the built-in demo model, or LLM(model="dir")
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32)).outputs[0].text)

    compiled = trtllm.compile(model)             # a plain nn.Module -> paged, fused, batched

The public names load on first use: `import trtllm` and every command's `--help` do not
import torch (about 5 s of a 6 s `--help` before).
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "compile": "trtllm.compile", "CompiledModel": "trtllm.compile", "CompileError": "trtllm.contract",
    "compile_encoder": "trtllm.compile_encoder", "CompiledEncoder": "trtllm.compile_encoder",
    "BuildConfig": "trtllm.config", "KvCacheConfig": "trtllm.config", "QuantAlgo": "trtllm.config",
    "QuantConfig": "trtllm.config", "ConfigError": "trtllm.config", "CudaGraphConfig": "trtllm.config",
    "SchedulerConfig": "trtllm.config", "CapacitySchedulerPolicy": "trtllm.config",
    "ContextChunkingPolicy": "trtllm.config",
    "load_model": "trtllm.models.loader", "LLM": "trtllm.runtime.llm",
    "RequestOutput": "trtllm.runtime.outputs", "CompletionOutput": "trtllm.runtime.outputs",
    "RequestError": "trtllm.runtime.outputs",
    "SamplingParams": "trtllm.sampling_params", "GuidedDecodingParams": "trtllm.guided_decoding_params",
    "LogitsProcessor": "trtllm.logits_processor", "BatchedLogitsProcessor": "trtllm.logits_processor",
    "NGramDecodingConfig": "trtllm.runtime.speculative.config",
    "DraftTargetDecodingConfig": "trtllm.runtime.speculative.config",
    "SpeculativeDecodingConfig": "trtllm.runtime.speculative.config",
    "EagleDecodingConfig": "trtllm.runtime.speculative.config",
    "MTPDecodingConfig": "trtllm.runtime.speculative.config",
    "LoraConfig": "trtllm.lora_config", "LoRARequest": "trtllm.lora_request",
    "MultimodalEncoder": "trtllm.runtime.multimodal_inputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trtllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule `trtllm.compile` (`trtllm.compile_encoder`) sets the package's
    attribute of that name to the module; the public name is the function it defines."""

    def __setattr__(self, name, value):
        if name in ("compile", "compile_encoder") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

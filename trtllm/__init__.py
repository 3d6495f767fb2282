"""trtllm: a kernel-first LLM inference compiler and runtime.

    from trtllm import LLM, SamplingParams
    llm = LLM()                                  # the built-in demo model, or LLM(model="dir")
    print(llm.generate("Once upon a time", SamplingParams(max_tokens=32)).outputs[0].text)

    compiled = trtllm.compile(model)             # a plain nn.Module -> paged, fused, batched
"""
from trtllm.compile import CompiledModel, CompileError, compile
from trtllm.config import BuildConfig, KvCacheConfig, QuantAlgo, QuantConfig
from trtllm.models.loader import load_model
from trtllm.runtime.llm import LLM
from trtllm.runtime.outputs import CompletionOutput, RequestOutput
from trtllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["compile", "CompiledModel", "CompileError", "load_model", "LLM", "SamplingParams",
           "KvCacheConfig", "BuildConfig", "QuantConfig", "QuantAlgo", "RequestOutput", "CompletionOutput"]

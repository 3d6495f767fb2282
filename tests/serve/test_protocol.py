"""Request bodies into SamplingParams (serve/protocol.py)."""
from __future__ import annotations

from trtllm.serve.protocol import ChatCompletionRequest, CompletionRequest


def test_a_request_without_temperature_samples_at_openais_default():
    # SamplingParams() left unset is greedy (TensorRT-LLM's rule); the server keeps OpenAI's temperature 1
    completion = CompletionRequest(model="m", prompt="hi").sampling_params(4, None)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]).sampling_params(4, None)
    assert (completion.temperature, chat.temperature) == (1.0, 1.0) and not completion.greedy
    assert CompletionRequest(model="m", prompt="hi", temperature=0).sampling_params(4, None).greedy

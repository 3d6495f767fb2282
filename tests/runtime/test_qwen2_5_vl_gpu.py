"""Qwen2.5-VL on a GPU (skipped without CUDA or with the Triton interpreter): the tiny random
checkpoint in fp32, its vision tower compiled by Inductor with the segment attention kernel, the
language model's decode and prefill steps replayed from CUDA graphs that read the M-RoPE
position buffer (and the overlap scheduler's launch-ahead steps): greedy output with one and two images equals
HF generate on the GPU, and the same engine without CUDA graphs."""
import os

import pytest
import torch

from tests.models.qwen_vl_checkpoints import hf_inputs, hf_qwen2_5_vl, write_qwen2_5_vl
from tests.runtime.test_qwen2_5_vl import images, prompt
from trtllm import LLM, BuildConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")
NEW = 12


def test_qwen2_5_vl_under_cuda_graphs_equals_hf_and_eager(tmp_path):
    path = write_qwen2_5_vl(tmp_path)
    hf = hf_qwen2_5_vl(path).cuda()
    requests = [(prompt(1), images(1, seed=1)), (prompt(2, "Compare."), images(2, seed=2)),
                ("<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n", [])]
    expected = []
    for text, imgs in requests:
        inputs = {k: v.cuda() for k, v in hf_inputs(path, text, imgs).items()}
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    prompts = [{"prompt": t, "multi_modal_data": {"image": i}} if i else t for t, i in requests]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    results = {}
    for graphs in (True, False):
        with LLM(model=str(path), dtype="float32", enable_cuda_graph=graphs,
                 build_config=BuildConfig(max_num_tokens=32)) as llm:
            assert bool(llm.engine.runner.cuda_graphs.decode) == bool(llm.engine.runner.cuda_graphs.prefill) == graphs
            results[graphs] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            # one at a time too: decode batches of one sequence
            results[graphs, "alone"] = [llm.generate(p, params).outputs[0].token_ids for p in prompts]
    assert results[True] == results[False] == results[True, "alone"] == results[False, "alone"] == expected

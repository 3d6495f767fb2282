"""LLaVA-1.5 / NeXT on a GPU (skipped without CUDA or with the Triton interpreter): the tiny random
checkpoints in fp32, the CLIP tower compiled by Inductor and replayed from CUDA graphs at 1, 2, 4
and 8 crops (runtime/encoder_graphs.py; 3 crops pad to 4, more than 8 run the tower as compiled):
greedy output with one, two and three images equals HF generate on the GPU and the same engine
without CUDA graphs, and the features a replay returns survive the next replay."""
import os

import pytest
import torch

from tests.models.multimodal_checkpoints import random_images, write_llava
from tests.runtime.test_multimodal import hf_greedy
from trtllm import LLM, SamplingParams
from trtllm.runtime.encoder_graphs import EncoderGraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")
NEW = 8


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_llava_tower_graphs_equal_hf_and_eager(family, tmp_path):
    path = write_llava(tmp_path, family)
    requests = []
    for n in (1, 2, 3):
        text = "USER: " + " and ".join(["<image>"] * n) + "\nWhat is this? ASSISTANT:"
        requests.append((text, random_images(n, seed=10 + n)))
    expected = [hf_greedy(path, text, images, NEW) for text, images in requests]  # HF on the CPU, fp32
    prompts = [{"prompt": t, "multi_modal_data": {"image": i}} for t, i in requests]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    results = {}
    for graphs in (True, False):
        with LLM(model=str(path), dtype="float32", enable_cuda_graph=graphs) as llm:
            module = llm.engine.runner.compiled.module
            assert isinstance(module.compiled_tower, EncoderGraphs) == graphs
            results[graphs] = [llm.generate(p, params).outputs[0].token_ids for p in prompts]
            if graphs:
                assert module.compiled_tower.num_replays >= (3 if family == "llava" else 1)
                results["batched"] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert results[True] == results[False] == results["batched"] == expected


def test_a_replay_leaves_earlier_features_alone(tmp_path):
    path = write_llava(tmp_path, "llava")
    with LLM(model=str(path), dtype="float32") as llm:
        module = llm.engine.runner.compiled.module
        v = module.config.vision
        a, b = (torch.randn((1, 3, v.image_size, v.image_size), device="cuda") for _ in range(2))
        first = module.tower_features(a)
        kept = first.clone()
        module.tower_features(b)
        assert torch.equal(first, kept)
        with torch.no_grad():
            eager = module.vision_tower(a, module.config.feature_layers)
        replayed = module.compiled_tower(a, module.config.feature_layers)
        for x, y in zip(replayed, eager):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)

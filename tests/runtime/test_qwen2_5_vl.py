"""Qwen2.5-VL (and Qwen2-VL) through `LLM`: the windowed vision encoder (eager and compiled) equals HF's, the
M-RoPE positions equal HF's get_rope_index, greedy output with one and two images (and text
only) equals HF `generate` token for token in fp32 with chunked prefill cutting the images,
and bad input is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.qwen_vl_checkpoints import IMAGE, hf_inputs, hf_qwen2_5_vl, write_qwen2_5_vl
from trtllm import LLM, BuildConfig, SamplingParams

pytest.importorskip("PIL")

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompt(num_images: int, question: str = "What is this?") -> str:
    return "<|im_start|>user\n" + " and ".join([IMAGE] * num_images) + f" {question}<|im_end|>\n<|im_start|>assistant\n"


def images(n: int, seed: int) -> list[np.ndarray]:
    """Images of different shapes: grids from 4x4 to 8x8 patches, ragged windows at the edges."""
    rng = np.random.default_rng(seed)
    shapes = [(50, 30), (28, 56), (56, 56), (40, 40)]
    return [rng.integers(0, 256, (*shapes[(seed + i) % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def checkpoint(request, tmp_path_factory):
    return write_qwen2_5_vl(tmp_path_factory.mktemp(request.param), family=request.param)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_qwen2_5_vl(checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    # max_num_tokens 16: every prompt is prefilled in chunks of 16, which cut the images anywhere
    with LLM(model=str(checkpoint), dtype="float32", build_config=BuildConfig(max_num_tokens=16)) as llm:
        yield llm


def hf_greedy(hf, checkpoint, text: str, imgs: list, n: int) -> list[int]:
    inputs = hf_inputs(checkpoint, text, imgs)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_vision_encoder_equals_hf_eager_and_compiled(checkpoint, hf):
    import transformers

    from trtllm.compile_encoder import compile_encoder
    from trtllm.models.llava import ImageInput
    from trtllm.models.loader import load_model
    model = load_model(checkpoint, dtype="float32", device="cpu")
    ip = transformers.Qwen2VLImageProcessor.from_pretrained(checkpoint)
    out = ip(images=images(4, seed=0), return_tensors="pt")
    pv, grid = out["pixel_values"], out["image_grid_thw"]
    assert len({tuple(g) for g in grid.tolist()}) > 2  # several grid shapes in one packed batch
    with torch.no_grad():
        want = hf.model.get_image_features(pv, grid)
        want = torch.cat(list(getattr(want, "pooler_output", want)))
        inputs = [ImageInput(p, None, tuple(g)) for p, g in zip(pv.split(grid.prod(-1).tolist()), grid.tolist())]
        eager = torch.cat(model.encode_images(inputs))
        torch.testing.assert_close(eager, want, atol=1e-5, rtol=1e-5)
        model.compiled_tower = compiled = compile_encoder(model.visual)
        torch.testing.assert_close(torch.cat(model.encode_images(inputs)), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(model.encode_images(inputs[1:3])), torch.cat(
            model.encode_images(inputs)[1:3]), atol=1e-5, rtol=1e-5)  # another patch count: the same graph code
    assert "segment_attention" in compiled.summary()


def test_mrope_positions_equal_hf_get_rope_index(checkpoint, hf, llm):
    from trtllm.runtime.mrope_positions import rope_index
    imgs = images(2, seed=1)
    text = "before " + IMAGE + " mid " + IMAGE + " after the images"
    inputs = hf_inputs(checkpoint, text, imgs)
    want, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"])
    _, ids, mm = llm.processor.process({"prompt": text, "multi_modal_data": {"image": imgs}})
    assert ids == inputs["input_ids"][0].tolist()
    table = rope_index(len(ids), mm.images, 2)
    assert table.positions.tolist() == want[:, 0].tolist()
    assert table.delta == int(delta) != 0


@pytest.mark.parametrize("num_images", [1, 2])
def test_greedy_equals_hf(checkpoint, hf, llm, num_images):
    imgs = images(num_images, seed=num_images)
    text = prompt(num_images)
    expected = hf_greedy(hf, checkpoint, text, imgs, 8)
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, SamplingParams(max_tokens=8, **GREEDY))
    assert out.outputs[0].token_ids == expected


@pytest.mark.parametrize("max_num_tokens", [16, 256], ids=["chunked", "whole"])
def test_prefill_graphs_stage_the_mrope_positions(checkpoint, hf, max_num_tokens):
    """Prefill steps replayed from (stand-in) prefill graphs, which read the three position
    rows staged before each replay (zeros past the step's tokens): HF's tokens for an image
    prompt beside a text-only one, whole prompts and chunks that cut the image."""
    from tests.runtime.test_model_runner import add_prefill_graphs
    imgs = images(1, seed=8)
    text = "<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n"
    with LLM(model=str(checkpoint), dtype="float32",
             build_config=BuildConfig(max_num_tokens=max_num_tokens, max_batch_size=4)) as llm:
        runner = llm.engine.runner
        assert runner.prefill_graphs_serve()
        graphs = add_prefill_graphs(llm, max_num_tokens)
        padding = []  # each replay's position rows past the step's tokens
        for g in graphs.values():
            real = g.replay
            g.replay = lambda g=g, real=real: (padding.append(runner.mrope.buffer[:g.tokens].clone()), real())[1]
        outs = llm.generate([{"prompt": prompt(1), "multi_modal_data": {"image": imgs}}, text],
                            SamplingParams(max_tokens=6, **GREEDY))
    assert sum(g.replays for g in graphs.values()) > 0
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, checkpoint, prompt(1), imgs, 6)
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, checkpoint, text, [], 6)
    assert any(rows[-1].tolist() == [0, 0, 0] for rows in padding)


def test_batch_of_image_and_text_prompts_equals_hf(checkpoint, hf, llm):
    """Three requests in one batch (their positions tables side by side in one step): an image
    prompt, another image's, and text only; each equals HF's alone."""
    a, b = images(1, seed=5), images(1, seed=6)
    prompts = [{"prompt": prompt(1), "multi_modal_data": {"image": a}},
               {"prompt": prompt(1, "Describe it."), "multi_modal_data": {"image": b}},
               "<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, checkpoint, prompt(1), a, 6)
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, checkpoint, prompt(1, "Describe it."), b, 6)
    assert outs[2].outputs[0].token_ids == hf_greedy(hf, checkpoint, prompts[2], [], 6)


def test_chat_with_image_part_equals_hf(checkpoint, hf, llm):
    """llm.chat's {"type": "image"} part becomes Qwen's vision span where the part stands."""
    image = images(1, seed=7)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=5, **GREEDY))
    text = "<|im_start|>user\n" + IMAGE + "Hi?<|im_end|>\n<|im_start|>assistant\n"
    assert out.outputs[0].token_ids == hf_greedy(hf, checkpoint, text, [image], 5)


def test_same_image_encoded_once(llm):
    image = images(1, seed=9)
    stager = llm.engine.runner.multimodal
    before = stager.cache.num_encoded
    for question in ("One?", "Two?"):
        llm.generate({"prompt": prompt(1, question), "multi_modal_data": {"image": image}},
                     SamplingParams(max_tokens=2, **GREEDY))
    assert stager.cache.num_encoded - before == 1


def test_bad_input_refused_by_name_engine_unaffected(llm):
    image = images(1, seed=2)[0]
    params = SamplingParams(max_tokens=3, **GREEDY)
    with pytest.raises(ValueError, match="1 image placeholder.*but 2 image"):
        llm.generate({"prompt": prompt(1), "multi_modal_data": {"image": [image, image]}}, params)
    with pytest.raises(ValueError, match="2 image placeholder.*but 1 image"):
        llm.generate({"prompt": prompt(2), "multi_modal_data": {"image": [image]}}, params)
    with pytest.raises(ValueError, match="video and audio are not supported"):
        llm.generate({"prompt": prompt(1), "multi_modal_data": {"video": [image]}}, params)
    ok = llm.generate({"prompt": prompt(1), "multi_modal_data": {"image": [image]}}, params)
    assert len(ok.outputs[0].token_ids) == 3


def test_image_span_and_grid_mismatch_refused():
    from trtllm.runtime.mrope_positions import rope_index
    from trtllm.runtime.multimodal_inputs import ImageSpan
    span = ImageSpan(b"0" * 16, 2, 5, torch.zeros(16, 294), None, (1, 4, 4))  # 4 tokens, not 5
    with pytest.raises(ValueError, match="is 4 tokens, but its placeholder run is 5"):
        rope_index(10, [span], 2)


def test_text_only_positions_are_one_dimensional_rope():
    """M-RoPE with equal axes is plain rope: a Llama-family model's positions [B, S] give the
    same cos/sin under both."""
    from trtllm.models.llama import RotaryEmbedding
    pos = torch.arange(7)[None]
    plain, mrope = RotaryEmbedding(16, 1e4, None), RotaryEmbedding(16, 1e4, None, [2, 3, 3])
    for a, b in zip(plain(pos, torch.float32), mrope(pos.expand(3, 1, 7), torch.float32)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sums to 7, not head_dim / 2 = 8"):
        RotaryEmbedding(16, 1e4, None, [2, 2, 3])


def test_prompt_logits_equal_hf_and_need_mrope(checkpoint, hf, llm):
    """The model file's logits over a two-image prompt, with the host's M-RoPE positions and the
    spliced features, equal HF's forward; the same with 1-D positions do not (the axes matter)."""
    from trtllm.models.llava import ImageInput
    from trtllm.models.loader import load_model
    from trtllm.multimodal_context import MultimodalEmbeddings, multimodal_context
    from trtllm.runtime.mrope_positions import rope_index
    imgs, text = images(2, seed=3), prompt(2)
    inputs = hf_inputs(checkpoint, text, imgs)
    model = load_model(checkpoint, dtype="float32", device="cpu")
    _, ids, mm = llm.processor.process({"prompt": text, "multi_modal_data": {"image": imgs}})
    with torch.no_grad():
        want = hf(**inputs).logits[0]
        features = torch.cat(model.encode_images([ImageInput(im.pixel_values, None, im.grid_thw) for im in mm.images]))
        rows = torch.full((len(ids),), -1, dtype=torch.long)
        image_rows = torch.cat([torch.arange(im.offset, im.offset + im.length) for im in mm.images])
        rows[image_rows] = torch.arange(len(image_rows))
        embeddings = MultimodalEmbeddings(len(ids), features.shape[1], torch.float32, "cpu")
        embeddings.fill(rows, features)
        positions = torch.from_numpy(rope_index(len(ids), mm.images, 2).positions)[:, None]  # [3, 1, L]
        with multimodal_context(embeddings):
            got = model(torch.tensor([ids]), positions)[0]
            flat = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (flat - want).abs().max() > 1e-2


def test_transformers5_layout_loads_alike(checkpoint, tmp_path):
    """The hub's layout (model.*, visual.*) and transformers 5's (model.language_model.*,
    model.visual.*) load into the same module."""
    import shutil

    from safetensors.torch import load_file, save_file

    from trtllm.models.loader import load_model
    tensors = load_file(str(checkpoint / "model.safetensors"))
    assert any(k.startswith("visual.") for k in tensors) and any(k.startswith("model.layers.") for k in tensors)
    reference = load_model(checkpoint, dtype=torch.float32, device="cpu").state_dict()
    d = tmp_path / "t5"
    shutil.copytree(checkpoint, d)
    save_file({("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
               for k, v in tensors.items()}, str(d / "model.safetensors"))
    loaded = load_model(d, dtype=torch.float32, device="cpu").state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_hub_config_layout():
    """Qwen2.5-VL-7B-Instruct's config.json as on the hub (transformers 4: text keys at the top,
    rope_scaling {"type": "mrope"}): read as the model's shapes."""
    from trtllm.models.qwen2_5_vl import Qwen25VLConfig
    hub = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
           "max_position_embeddings": 128000, "sliding_window": 32768, "use_sliding_window": False,
           "max_window_layers": 28, "tie_word_embeddings": False, "hidden_act": "silu",
           "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                             "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                             "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                             "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}}
    config = Qwen25VLConfig.from_hf(hub)
    assert config.text.mrope_section == [16, 24, 24] and config.text.rope_theta == 1e6
    assert config.text.head_dim == 128 and config.text.qkv_bias and not config.text.o_bias
    assert config.text.layer_windows == [0] * 28 and config.position_axes == 3
    assert config.vision.fullatt_block_indexes == [7, 15, 23, 31] and config.vision.head_dim == 80
    assert config.vision.patch_dim == 3 * 2 * 14 * 14 and config.image_token_id == 151655
    with pytest.raises(ValueError, match="needs rope mrope_section"):
        Qwen25VLConfig.from_hf(dict(hub, rope_scaling={"type": "mrope"}))


def test_an_adapter_on_the_language_model_with_an_image_equals_peft(checkpoint, tmp_path):
    # peft names transformers 5's paths (model.language_model.*): checkpoint_name maps them (docs/lora.md)
    from tests.lora_adapters import write_adapter
    from trtllm import LoraConfig, LoRARequest
    peft_model = write_adapter(checkpoint, tmp_path / "adapter", targets=r".*language_model.*\.(q_proj|o_proj|up_proj)",
                               seed=7, model=hf_qwen2_5_vl(checkpoint))
    text, imgs = prompt(1), images(1, 3)
    params = SamplingParams(max_tokens=6, **GREEDY)
    with LLM(model=str(checkpoint), dtype="float32", lora_config=LoraConfig(max_lora_rank=8)) as llm:
        got = llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, params,
                           lora_request=LoRARequest("lm", 1, str(tmp_path / "adapter")))
    want = hf_greedy(peft_model, checkpoint, text, imgs, 6)
    assert want != hf_greedy(hf_qwen2_5_vl(checkpoint), checkpoint, text, imgs, 6)
    assert got.outputs[0].token_ids == want


def test_ngram_speculation_with_an_image_gives_hf_tokens(checkpoint, hf):
    # the verify steps' draft tokens take M-RoPE text positions after the image (mrope_positions.py)
    from trtllm import NGramDecodingConfig
    text, imgs = prompt(1, "one two three one two three one two"), images(1, 5)
    with LLM(model=str(checkpoint), dtype="float32", speculative_config=NGramDecodingConfig(max_draft_len=3)) as llm:
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, SamplingParams(max_tokens=12, **GREEDY))
        accepted = vars(llm.engine_stats())["spec_accepted_tokens"]
    assert out.outputs[0].token_ids == hf_greedy(hf, checkpoint, text, imgs, 12)
    assert accepted > 0, "no draft accepted: the verify steps' positions went untested"


def test_an_eagle3_head_with_an_image_gives_hf_tokens(tmp_path):
    # the head runs on its mirror's 1-D positions (its rotary is plain RoPE); the target verifies on M-RoPE
    from tests.runtime.test_eagle3 import write_head
    from trtllm import EagleDecodingConfig
    checkpoint = write_qwen2_5_vl(tmp_path / "qwen4", num_text_layers=4)  # three distinct layers for the head
    head = write_head(tmp_path / "head", aux=[0, 1, 2])
    text, imgs = prompt(1, "one two three one two three one two"), images(1, 5)
    with LLM(model=str(checkpoint), dtype="float32",
             speculative_config=EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(head))) as llm:
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, SamplingParams(max_tokens=12, **GREEDY))
        assert vars(llm.engine_stats())["spec_draft_tokens"] > 0
    assert out.outputs[0].token_ids == hf_greedy(hf_qwen2_5_vl(checkpoint), checkpoint, text, imgs, 12)

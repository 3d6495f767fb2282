"""Multimodal requests (LLaVA-1.5, LLaVA-NeXT) through `LLM`: greedy output equals HF `generate`
token for token (fp32), the encoder cache, the prefix cache's image keys, chunked prefill through
an image, and bad input refused by name with the engine unaffected."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.multimodal_checkpoints import hf_llava, random_images, write_llava
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, SamplingParams

pytest.importorskip("PIL")

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def llava(request, tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llm(llava):
    with LLM(model=str(llava), dtype="float32") as llm:
        yield llm


def hf_greedy(directory, text: str, images: list, n: int) -> list[int]:
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(directory)
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = hf_llava(directory).generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("num_images", [1, 2])
def test_greedy_equals_hf(llava, llm, num_images):
    images = random_images(num_images, seed=num_images)
    text = "USER: " + " and ".join(["<image>"] * num_images) + "\nWhat is this? ASSISTANT:"
    expected = hf_greedy(llava, text, images, 8)
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, SamplingParams(max_tokens=8, **GREEDY))
    assert out.outputs[0].token_ids == expected
    # TensorRT-LLM's other spelling, images as a tensor [C, H, W] and as a PIL image
    from PIL import Image
    as_tensor = torch.from_numpy(images[0]).permute(2, 0, 1)
    for image in (as_tensor, Image.fromarray(images[0])):
        if num_images == 1:
            out = llm.generate(inputs={"text": text, "image": image}, sampling_params=SamplingParams(max_tokens=8,
                                                                                                      **GREEDY))
            assert out.outputs[0].token_ids == expected


def test_chat_with_image_parts_and_n2(llava, llm):
    """llm.chat's {"type": "image"} parts: the placeholder where the part stands; n=2 greedy
    completions of one image prompt are both HF's."""
    image = random_images(1, seed=4)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    out = llm.chat(messages, SamplingParams(max_tokens=5, **GREEDY))
    text = "USER: <image>Hi?\nASSISTANT:"
    expected = hf_greedy(llava, text, [image], 5)
    assert out.outputs[0].token_ids == expected
    two = llm.generate({"prompt": text, "multi_modal_data": {"image": [image]}},
                       SamplingParams(max_tokens=5, n=2, **GREEDY))
    assert [c.token_ids for c in two.outputs] == [expected, expected]


def test_an_image_chat_whose_template_writes_the_bos_gets_it_once(llava, llm):
    """A chat template that writes the BOS (Llama 3's), rendered and handed to the processor with
    its images: the processor's tokenizer added a second one (transformers' apply_chat_template
    leaves it out when the text starts with it)."""
    from tokenizers import processors
    tokenizer = llm.processor.get().tokenizer
    saved = tokenizer._tokenizer.post_processor, tokenizer.bos_token
    tokenizer.bos_token = "<|im_start|>"  # the test tokenizer has none
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=f"{tokenizer.bos_token} $A",
                                                                        special_tokens=[(tokenizer.bos_token, bos)])
    try:
        image = random_images(1, seed=5)[0]
        assert tokenizer("Hi")["input_ids"][0] == bos  # text gets a BOS
        for text in (f"{tokenizer.bos_token}USER: <image>Hi?\nASSISTANT:", f"{tokenizer.bos_token}USER: Hi?"):
            _, ids, _ = llm.processor.process({"prompt": text, "multi_modal_data": {"image": [image]}}
                                              if "<image>" in text else {"prompt": text})
            assert ids[0] == bos and ids[1] != bos, ids[:3]
        _, ids, _ = llm.processor.process({"prompt": "USER: <image>Hi?", "multi_modal_data": {"image": [image]}})
        assert ids[0] == bos and ids[1] != bos  # no BOS written: the tokenizer's one
    finally:
        tokenizer._tokenizer.post_processor, tokenizer.bos_token = saved


def test_text_only_prompt_on_llava_equals_hf(llava, llm):
    text = "USER: Hello there. ASSISTANT:"
    assert llm.generate(text, SamplingParams(max_tokens=6, **GREEDY)).outputs[0].token_ids == \
        hf_greedy(llava, text, [], 6)


def test_chunked_prefill_through_an_image(llava):
    """max_num_tokens 16: every prompt is prefilled in chunks of 16, which cut the images' 16+
    tokens (and the text) anywhere; output still equals HF's."""
    images = random_images(2, seed=7)
    text = "USER: <image> and <image>\nDescribe. ASSISTANT:"
    with LLM(model=str(llava), dtype="float32", build_config=BuildConfig(max_num_tokens=16, max_batch_size=4)) as llm:
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}},
                           SamplingParams(max_tokens=6, **GREEDY))
    assert out.outputs[0].token_ids == hf_greedy(llava, text, images, 6)


def test_same_image_encoded_once_and_reuses_blocks(llm):
    cache = llm.engine.runner.multimodal.cache
    image = random_images(1, seed=11)[0]
    before = cache.num_encoded
    prompt = {"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "multi_modal_data": {"image": [image]}}
    first = llm.generate(prompt, SamplingParams(max_tokens=4, **GREEDY))
    second = llm.generate(dict(prompt, multi_modal_data={"image": [image.copy()]}),
                          SamplingParams(max_tokens=4, **GREEDY))
    assert cache.num_encoded == before + 1  # the second request's copy hit the cache
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert second.num_cached_tokens > 0  # its blocks holding the image were reused
    # several images in one batch, one of them twice: each distinct one encoded once
    a, b = random_images(2, seed=12)
    llm.generate([{"prompt": "<image> <image>", "multi_modal_data": {"image": [a, b]}},
                  {"prompt": "x <image>", "multi_modal_data": {"image": [a]}}], SamplingParams(max_tokens=2, **GREEDY))
    assert cache.num_encoded == before + 3


def test_an_images_hash_does_not_depend_on_its_prompt_mates(llava):
    """LLaVA-NeXT's processor pads every image of a prompt to the most crops any has; the
    padding is not the image's: the same image beside a larger one hashes as it does alone
    (before, it hashed anew there, was encoded again and missed its cached blocks)."""
    from transformers import AutoProcessor

    from trtllm.runtime.multimodal_inputs import process_prompt
    processor = AutoProcessor.from_pretrained(llava)
    small, large = random_images(3, seed=13)[2], random_images(1, seed=13)[0]  # 28x28 and 40x30
    token = processor.tokenizer.convert_tokens_to_ids("<image>")
    _, alone = process_prompt(processor, "<image>", [small], token)
    _, beside = process_prompt(processor, "<image> <image>", [small, large], token)
    assert alone.images[0].hash == beside.images[0].hash
    assert alone.images[0].pixel_values.shape == beside.images[0].pixel_values.shape
    assert beside.images[0].hash != beside.images[1].hash


def test_different_images_same_text_share_no_blocks(llm):
    text = "<image>\nWhat is in the picture, in a few words? ASSISTANT:"
    a, b = random_images(2, seed=21)
    outs = [llm.generate({"prompt": text, "multi_modal_data": {"image": [im]}}, SamplingParams(max_tokens=6, **GREEDY))
            for im in (a, b)]
    assert outs[1].num_cached_tokens == 0  # the image starts the prompt: no block of it is shared
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_text_before_the_image_is_shared_the_image_blocks_are_not(llm):
    """The image's hash keys the blocks holding its tokens (and, by the chain, every block after):
    the full blocks of a shared text prefix before it are reused, none from its first block on."""
    prefix = "A long shared introduction of text that fills two blocks or more. " * 2
    a, b = random_images(2, seed=31)
    params = SamplingParams(max_tokens=2, **GREEDY)
    first = llm.generate({"prompt": prefix + "<image> tail", "multi_modal_data": {"image": [a]}}, params)
    second = llm.generate({"prompt": prefix + "<image> tail", "multi_modal_data": {"image": [b]}}, params)
    start = first.prompt_token_ids.index(llm.processor.image_token_id)
    block = llm.block_manager.block_size
    assert start >= 2 * block
    assert second.num_cached_tokens == start // block * block


def test_checkpoint_layouts_load_alike(llava, tmp_path):
    """The hub's layout (vision_tower.vision_model.*) and the other (model.language_model.*,
    model.vision_tower.*, ...) load into the same module."""
    import shutil

    from safetensors.torch import load_file, save_file

    from trtllm.models.loader import load_model
    tensors = load_file(str(llava / "model.safetensors"))
    reference = load_model(llava, dtype=torch.float32, device="cpu").state_dict()
    layouts = {
        "hub": lambda n: n.replace("vision_tower.", "vision_tower.vision_model.", 1),
        "model.": lambda n: ("model." + n.replace("language_model.model.", "language_model.", 1)
                             if not n.startswith("language_model.lm_head") else n.replace("language_model.", "", 1)),
    }
    for name, rename in layouts.items():
        d = tmp_path / name
        shutil.copytree(llava, d)
        save_file({rename(k): v for k, v in tensors.items()}, str(d / "model.safetensors"))
        loaded = load_model(d, dtype=torch.float32, device="cpu").state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_bad_input_refused_by_name_engine_unaffected(llm):
    image = random_images(1)[0]
    params = SamplingParams(max_tokens=3, **GREEDY)
    with pytest.raises(ValueError, match="1 image placeholder.*but 2 image"):
        llm.generate({"prompt": "<image> two?", "multi_modal_data": {"image": [image, image]}}, params)
    with pytest.raises(ValueError, match="2 image placeholder.*but 1 image"):
        llm.generate({"prompt": "<image> <image>", "multi_modal_data": {"image": [image]}}, params)
    with pytest.raises(ValueError, match="not an image"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [np.zeros((5, 7, 9, 2))]}}, params)
    with pytest.raises(ValueError, match="finite"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [np.full((8, 8, 3), np.nan)]}}, params)
    # floats are 0-1: 0-255 values as floats were clipped to a white image, negative ones to black
    with pytest.raises(ValueError, match=r"float values span \[0, 255\]; floats are 0-1"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [image.astype(np.float32)]}}, params)
    with pytest.raises(ValueError, match=r"float values span \[-1, 1\]"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [np.linspace(-1, 1, 192).reshape(8, 8, 3)]}},
                     params)
    # tensors numpy has no dtype for: bfloat16 is taken (as float32), a meta tensor named (were torch's
    # TypeError 'Got unsupported ScalarType BFloat16' / NotImplementedError)
    as_bf16 = torch.from_numpy(image).permute(2, 0, 1).to(torch.bfloat16) / 255
    assert llm.processor.process({"prompt": "<image>", "image": as_bf16})[2].images[0].hash == \
        llm.processor.process({"prompt": "<image>", "image": as_bf16.float()})[2].images[0].hash
    with pytest.raises(ValueError, match="meta device holds no pixels"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [torch.empty(3, 8, 8, device="meta")]}}, params)
    from PIL import Image
    with pytest.raises(ValueError, match="0x5 pixels, an empty image"):  # was the processor's ZeroDivisionError
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [Image.new("RGB", (0, 5))]}}, params)
    overshoot = image / 255 * 1.08 - 0.04  # a bicubic resize's few percent past 0 and 1: clipped, taken
    assert llm.processor.process({"prompt": "<image>", "image": overshoot})[2].images[0].hash == \
        llm.processor.process({"prompt": "<image>", "image": np.clip(overshoot, 0, 1)})[2].images[0].hash
    with pytest.raises(ValueError, match="a PIL image, numpy array or torch tensor"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [b"\x89PNG garbage"]}}, params)
    with pytest.raises(ValueError, match="more than the .* allowed"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [np.zeros((4097, 4097), np.uint8)]}}, params)
    # within the pixel cap, but the processor scales the short side up to its size first: a 1 x 400,000
    # sliver took 3.6 GB and 10 s at this checkpoint's 28 pixels (LLaVA's 336: tens of GB)
    with pytest.raises(ValueError, match=r"400000x1 pixels, an aspect ratio past 200:1"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [np.zeros((1, 400_000, 3), np.uint8)]}},
                     params)
    with pytest.raises(ValueError, match=r"1x201 pixels, an aspect ratio past 200:1"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": [Image.new("RGB", (1, 201))]}}, params)
    assert len(llm.processor.process({"prompt": "<image>", "image": Image.new("RGB", (1, 200))})[1]) > 1
    with pytest.raises(ValueError, match="video and audio are not supported"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"video": [image]}}, params)
    ok = llm.generate({"prompt": "<image> still fine", "multi_modal_data": {"image": [image]}}, params)
    assert len(ok.outputs[0].token_ids) == 3


def test_an_image_placeholder_without_its_image_is_refused(llm):
    """A text, token-id or chat prompt holding the image token with no image: the model read the
    placeholder's own embedding and answered about no image, silently. Refused by name at
    submission; the engine goes on."""
    params = SamplingParams(max_tokens=2, **GREEDY)
    token = llm.processor.image_token_id
    for prompt in ("USER: <image> what is this? ASSISTANT:", [1, token, 5, 6]):
        with pytest.raises(ValueError, match=rf"the prompt holds 1 image token\(s\) \(id {token}, the image "
                                             r"placeholder\) but its images fill 0"):
            llm.generate(prompt, params)
    with pytest.raises(ValueError, match="holds 1 image token"):
        llm.chat([{"role": "user", "content": "<image> hi"}], params)
    assert len(llm.generate("USER: hi ASSISTANT:", params).outputs[0].token_ids) == 2
    image = random_images(1)[0]
    assert len(llm.generate({"prompt": "<image> hi", "image": image}, params).outputs[0].token_ids) == 2


def test_a_16_bit_image_is_its_8_bit_image(llm):
    """A 16-bit grayscale image (PIL mode I;16, a 16-bit PNG; or a uint16 array) is processed as
    the same image in 8 bits: PIL's convert("RGB") clipped its samples at 255 (a white image,
    answered silently). The server's decoder keeps the mode for check_image to convert."""
    import io

    from PIL import Image

    from trtllm.serve.media import MediaPolicy, load_image
    gray = random_images(1, seed=3)[0][:, :, 0]
    wide = gray.astype(np.uint16) * 257

    def image_hash(image):
        return llm.processor.process({"prompt": "<image>", "image": image})[2].images[0].hash

    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    png16 = "data:image/png;base64," + __import__("base64").b64encode(buf.getvalue()).decode()
    expected = image_hash(Image.fromarray(gray))
    assert Image.fromarray(wide).mode.startswith("I;16")
    assert image_hash(Image.fromarray(wide)) == expected
    assert image_hash(wide) == expected
    assert image_hash(load_image(png16, 0, MediaPolicy())) == expected
    # int32 / float PIL images follow the array rules: refused by name, not clipped
    with pytest.raises(ValueError, match="dtype int32"):
        image_hash(Image.fromarray(wide.astype(np.int32)))
    with pytest.raises(ValueError, match=r"float values span \[0, 65535\]"):
        image_hash(Image.fromarray(wide.astype(np.float32)))


@pytest.mark.parametrize("shape", [(3, 40, 3), (4, 40, 3), (1, 40, 3), (1, 1, 3)])
def test_an_image_of_1_3_or_4_rows_is_read_channels_last(llm, shape):
    """An [H, W, 3] array whose H is 1, 3 or 4: the processor, given the array, guessed its
    channel axis first (a (3, 40, 3) image processed as 40x3 pixels of 3 channels, silently;
    (1, W, 3) refused with 'mean must have 1 elements'). It is the image PIL reads it as."""
    from PIL import Image
    array = random_images(1, seed=5)[0][:shape[0], :shape[1]]

    def processed(image):
        return llm.processor.process({"prompt": "<image>", "image": image})[2].images[0]

    got, expected = processed(array), processed(Image.fromarray(array))
    assert got.hash == expected.hash and torch.equal(got.pixel_values, expected.pixel_values)


def test_image_for_a_text_only_model_refused(checkpoint):
    make_tokenizer(checkpoint)
    with LLM(model=str(checkpoint), dtype="float32") as llm:
        with pytest.raises(ValueError, match="takes no images"):
            llm.generate({"prompt": "hi <image>", "multi_modal_data": {"image": random_images(1)}})
        with pytest.raises(ValueError, match="takes no images"):
            llm.engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2),
                                   multimodal=_fake_multimodal())


def _fake_multimodal():
    from trtllm.runtime.multimodal_inputs import ImageSpan, MultimodalData
    return MultimodalData([ImageSpan(b"0" * 16, 0, 2, torch.zeros(3, 28, 28))])


def test_beam_search_with_images_equals_hf(llava):
    # every beam carries the request's images: the leader's prefill splices them, the followers fork its
    # blocks, and a beam's later blocks hash from the images as the leader's do
    from transformers import AutoProcessor
    image, text = random_images(1)[0], "USER: <image> describe ASSISTANT:"
    with LLM(model=str(llava), dtype="float32", build_config=BuildConfig(max_beam_width=3)) as llm:
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": [image]}},
                           SamplingParams(max_tokens=6, beam_width=3, n=2, ignore_eos=True))
        llm.block_manager.check_invariants()
        beams = llm.generate("text only", SamplingParams(max_tokens=3, use_beam_search=True, n=2, best_of=2))
        assert len(beams.outputs) == 2
    inputs = AutoProcessor.from_pretrained(llava)(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        want = hf_llava(llava).generate(**inputs, max_new_tokens=6, min_new_tokens=6, num_beams=3,
                                        num_return_sequences=2, do_sample=False, early_stopping=False)
    assert [c.token_ids for c in out.outputs] == want[:, inputs["input_ids"].shape[1]:].tolist()
    from trtllm.runtime.beams import BeamGroup
    images = _fake_multimodal()  # a follower's blocks must hash from the images too (never shared with text)
    group = BeamGroup("r", [1, 2, 3], SamplingParams(max_tokens=2, beam_width=3), [2], 32, multimodal=images)
    assert all(b.multimodal is images for b in group.beams)


def test_an_adapter_on_the_language_model_with_an_image_equals_peft(llava, tmp_path):
    # peft names the HF model's paths (model.language_model.*): LLaVA's checkpoint_name maps them to
    # ours (LoraSlots.module_path); an adapter on the vision tower is refused by name
    from transformers import AutoProcessor

    from tests.lora_adapters import write_adapter
    from trtllm import LoraConfig, LoRARequest
    peft_model = write_adapter(llava, tmp_path / "adapter", targets=r".*language_model.*\.(q_proj|v_proj|down_proj)",
                               seed=7, model=hf_llava(llava))
    write_adapter(llava, tmp_path / "vision", r=4, targets=r".*vision_tower.*\.q_proj", model=hf_llava(llava))
    image, text = random_images(1)[0], "USER: <image> describe ASSISTANT:"
    prompt = {"prompt": text, "multi_modal_data": {"image": [image]}}
    params = SamplingParams(max_tokens=6, **GREEDY)
    with LLM(model=str(llava), dtype="float32", lora_config=LoraConfig(max_lora_rank=8)) as llm:
        got = llm.generate(prompt, params, lora_request=LoRARequest("lm", 1, str(tmp_path / "adapter")))
        base = llm.generate(prompt, params)
        with pytest.raises(ValueError, match="vision_tower.* this engine wraps no such linear"):
            llm.generate(prompt, params, lora_request=LoRARequest("vision", 2, str(tmp_path / "vision")))
    inputs = AutoProcessor.from_pretrained(llava)(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        want = peft_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    want = want[0, inputs["input_ids"].shape[1]:].tolist()
    assert want != base.outputs[0].token_ids, "the adapter changes nothing: the test could not fail"
    assert got.outputs[0].token_ids == want


def test_speculation_with_images_gives_the_target_tokens(llava):
    # n-gram drafts from the request's own tokens (image placeholders included), verified by the target
    # with the images spliced at prefill: HF's greedy tokens, drafts accepted on the repeating text
    from trtllm import DraftTargetDecodingConfig, NGramDecodingConfig
    image, text = random_images(1)[0], "USER: <image> one two three one two three one two ASSISTANT:"
    with LLM(model=str(llava), dtype="float32", speculative_config=NGramDecodingConfig(max_draft_len=3)) as llm:
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": [image]}},
                           SamplingParams(max_tokens=12, **GREEDY))
        assert vars(llm.engine_stats())["spec_accepted_tokens"] > 0
    assert out.outputs[0].token_ids == hf_greedy(llava, text, [image], 12)
    # a draft model reads the placeholders as text (here the checkpoint itself, with no images): its
    # drafts are rejected where they differ, the tokens are the target's
    draft = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(llava))
    with LLM(model=str(llava), dtype="float32", speculative_config=draft) as llm:
        again = llm.generate({"prompt": text, "multi_modal_data": {"image": [image]}},
                             SamplingParams(max_tokens=12, **GREEDY))
        assert vars(llm.engine_stats())["spec_draft_tokens"] > 0
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_mtp_on_a_multimodal_model_refused_by_name(llava):
    from trtllm import MTPDecodingConfig
    with pytest.raises(ValueError, match="a multimodal model.* with MTPDecodingConfig is not supported .it has no MTP"):
        LLM(model=str(llava), dtype="float32", speculative_config=MTPDecodingConfig(num_nextn_predict_layers=1))


def test_an_eagle3_head_with_images_gives_the_target_tokens(tmp_path):
    # the head reads the target's states at the image rows as at any other (a head trained on text
    # proposes worse there: fewer accepted, never other tokens); its embedding is the language model's
    from tests.runtime.test_eagle3 import write_head
    from trtllm import EagleDecodingConfig
    llava = write_llava(tmp_path / "llava4", num_text_layers=4)  # three distinct layers for the head to read
    head = write_head(tmp_path / "head", aux=[0, 1, 2])
    image, text = random_images(1)[0], "USER: <image> one two three one two three one two ASSISTANT:"
    with LLM(model=str(llava), dtype="float32",
             speculative_config=EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(head))) as llm:
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": [image]}},
                           SamplingParams(max_tokens=12, **GREEDY))
        assert vars(llm.engine_stats())["spec_draft_tokens"] > 0
        llm.block_manager.check_invariants()
    assert out.outputs[0].token_ids == hf_greedy(llava, text, [image], 12)


def test_gemma3_multimodal_refused_by_name(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Gemma-3 \(multimodal\) checkpoints .* not supported yet"):
        LLM(model=str(tmp_path))


def test_multimodal_encoder_spelling(llava):
    from trtllm import MultimodalEncoder
    with pytest.raises(ValueError, match="a separate vision encoder is not supported"):
        LLM(model=str(llava), multimodal_encoder=MultimodalEncoder(vision_encoder_path="/elsewhere"))


@pytest.mark.parametrize("max_num_tokens", [16, 256], ids=["chunked", "whole"])
def test_prefill_graphs_splice_the_images(llava, max_num_tokens):
    """Prefill steps replayed from (stand-in) prefill graphs, which read the image rows staged
    before each replay (padded past the step's tokens with -1): HF's tokens, whole prompts and
    chunks that cut an image."""
    from tests.runtime.test_model_runner import add_prefill_graphs
    images = random_images(2, seed=9)
    text = "USER: <image> and <image>\nDescribe. ASSISTANT:"
    with LLM(model=str(llava), dtype="float32",
             build_config=BuildConfig(max_num_tokens=max_num_tokens, max_batch_size=4)) as llm:
        runner = llm.engine.runner
        assert runner.prefill_graphs_serve()
        graphs = add_prefill_graphs(llm, max_num_tokens)
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}},
                           SamplingParams(max_tokens=6, **GREEDY))
    assert sum(g.replays for g in graphs.values()) > 0
    assert out.outputs[0].token_ids == hf_greedy(llava, text, images, 6)


def test_online_fp8_quantizes_the_language_model_only(llava, llm):
    # the vision tower and projector run before the step, outside the compiled graph whose passes place
    # the FP8 GEMMs: they stay in the model's dtype (quantized, they ran on placeholder weights: NaN)
    from trtllm import QuantAlgo, QuantConfig
    from trtllm.quantization.fp8_linears import fp8_linears_of
    prompt = {"prompt": "USER: <image> describe ASSISTANT:", "multi_modal_data": {"image": random_images(1, seed=21)}}
    with LLM(model=str(llava), dtype="float32", quant_config=QuantConfig(quant_algo=QuantAlgo.FP8)) as fp8:
        out = fp8.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))
        quantized = list(fp8_linears_of(fp8.compiled.module).linears)
        features = dict(fp8.engine.runner.multimodal.cache._features)
    assert quantized and all(p.startswith("language_model.") for p in quantized)
    assert len(out.outputs[0].token_ids) == 6
    llm.generate(prompt, SamplingParams(max_tokens=1, **GREEDY))
    for image_hash, f in features.items():
        torch.testing.assert_close(f, llm.engine.runner.multimodal.cache._features[image_hash])

"""trtllm-serve on a tiny LLaVA checkpoint, through the official `openai` client: chat content
parts with base64 images give the offline LLM's greedy output; remote URLs, local files outside
--allowed_local_media_path, too many images, oversize (decompression-bomb) and corrupt images are
refused with 400/403/413, the server unaffected; a crowd of image requests at once (drops, bad images) gives
each what it gives alone and leaves no block held; a text-only model refuses image parts."""
import base64
import io
import re
import struct
import zlib

import numpy as np
import openai
import pytest

from tests.models.multimodal_checkpoints import hf_llava, random_images, write_llava
from tests.serve.server import Server
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PIL = pytest.importorskip("PIL.Image")


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    PIL.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels (a few hundred bytes of zeros' deflate)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    rows = zlib.compress(b"\0" * (width + 1) * 64)  # some rows: the header is what is read first
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("serve_llava"), "llava")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "a.png").write_bytes(png_bytes(random_images(1, seed=5)[0]))
    return root


@pytest.fixture(scope="module")
def llava_server(llava_dir, media_dir, tmp_path_factory):
    with Server(llava_dir, "--allowed_local_media_path", str(media_dir), "--max_images_per_request", "2",
                "--max_image_pixels", "10000", "--max_seq_len", "256", "--max_num_tokens", "128", log_path=tmp_path_factory.mktemp("llava_log") / "server.log") as s:
        yield s
    assert s.proc.returncode == 0, s.log()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def image_message(*urls: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_base64_images_equal_offline_llm(llava_server, llava_dir, media_dir):
    images = random_images(2, seed=3)
    c = client(llava_server)
    got = c.chat.completions.create(model="tiny", messages=image_message(*(data_url(png_bytes(a)) for a in images)),
                                    max_tokens=6, temperature=0.0)
    one = c.chat.completions.create(model="tiny", messages=image_message(data_url(png_bytes(images[0]))),
                                    max_tokens=6, temperature=0.0)
    local = c.chat.completions.create(model="tiny", messages=image_message(f"file://{media_dir / 'a.png'}"),
                                      max_tokens=6, temperature=0.0)
    with LLM(model=str(llava_dir), dtype="float32") as llm:
        processor = llm.processor.get()
        def offline(arrays):
            text = processor.apply_chat_template(
                [{"role": "user", "content": [*({"type": "image"} for _ in arrays),
                                              {"type": "text", "text": "What is this?"}]}],
                add_generation_prompt=True)
            text = text.replace("<image>\n", "<image>")  # the server puts the placeholder where the part is
            return llm.generate({"prompt": text, "multi_modal_data": {"image": arrays}},
                                SamplingParams(max_tokens=6, temperature=0.0)).outputs[0].text
        assert got.choices[0].message.content == offline(images)
        assert one.choices[0].message.content == offline(images[:1])
        assert local.choices[0].message.content == offline([np.asarray(PIL.open(media_dir / "a.png"))])
    assert got.usage.prompt_tokens > 2 * 16  # each image expanded to its 16 tokens


def test_responses_input_image_equals_the_chat(llava_server):
    """/v1/responses' input_image part (its image_url a string) is the chat's image_url part."""
    url = data_url(png_bytes(random_images(1, seed=9)[0]))
    c = client(llava_server)
    r = c.responses.create(model="tiny", max_output_tokens=6, temperature=0.0, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": "What is this?"}]}])
    chat = c.chat.completions.create(model="tiny", messages=image_message(url), max_tokens=6, temperature=0.0)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens > 16


@pytest.mark.parametrize("url,status,message", [
    ("https://example.com/cat.png", 400, "remote image URLs are not fetched"),
    ("http://127.0.0.1:1/x.png", 400, "remote image URLs are not fetched"),
    ("file:///etc/passwd", 403, "outside --allowed_local_media_path"),
    ("ftp://host/x.png", 400, "scheme 'ftp' is not supported"),
    ("data:image/png;base64,!!!notbase64", 400, "base64 is not valid"),
    (data_url(b"\x89PNG\r\n\x1a\n garbage"), 400, "not a readable image"),
    (data_url(bomb_png(100_000, 100_000)), 413, "more than the 10000"),  # PIL's DecompressionBombError
    (data_url(bomb_png(20_000, 1_000)), 413, "20000x1000 pixels, more than the 10000"),  # ours, from the header
    (data_url(png_bytes(np.zeros((101, 100, 3), np.uint8))), 413, "100x101 pixels, more than the 10000"),
    # within the pixel cap, but resized to the processor's short side it was 28 x 201 x 28 pixels and up
    (data_url(png_bytes(np.zeros((1, 201, 3), np.uint8))), 400, "image 0: 201x1 pixels, an aspect ratio past 200:1"),
], ids=["https", "http", "file-outside", "ftp", "bad-base64", "corrupt-png", "bomb-png", "header-png",
        "oversize-png", "sliver-png"])
def test_bad_images_refused(llava_server, url, status, message):
    with pytest.raises(openai.APIStatusError) as e:
        client(llava_server).chat.completions.create(model="tiny", messages=image_message(url), max_tokens=2)
    assert e.value.status_code == status
    assert re.search(message, e.value.message), e.value.message


def test_too_many_images_and_placeholder_counts(llava_server):
    url = data_url(png_bytes(random_images(1)[0]))
    c = client(llava_server)
    with pytest.raises(openai.BadRequestError, match="3 images in one request; this server takes at most 2"):
        c.chat.completions.create(model="tiny", messages=image_message(url, url, url), max_tokens=2)
    # a placeholder typed in the text besides the part: one more placeholder than images
    with pytest.raises(openai.BadRequestError, match="2 image placeholder"):
        c.chat.completions.create(model="tiny", messages=image_message(url, text="and <image>"), max_tokens=2)
    # the placeholder typed in a text-only chat or completion: no image fills it (was answered silently)
    with pytest.raises(openai.BadRequestError, match=r"messages: the prompt holds 1 image token.* images fill 0"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "<image> hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"prompt: the prompt holds 1 image token"):
        c.completions.create(model="tiny", prompt="USER: <image> hi", max_tokens=2)
    ok = c.chat.completions.create(model="tiny", messages=image_message(url), max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_text_only_model_refuses_image_parts(server):
    url = data_url(png_bytes(random_images(1)[0]))
    with pytest.raises(openai.BadRequestError, match="this model takes no images"):
        client(server).chat.completions.create(model="tiny", messages=image_message(url), max_tokens=2)


@pytest.mark.slow  # ~65 s on the CI CPU: a second server process (the LLaVA server covers the serving path)
def test_qwen2_5_vl_base64_image_equals_offline_llm(tmp_path_factory):
    """Qwen2.5-VL behind the server: an image_url part becomes its vision span where the part
    stands; the answer equals the offline LLM on the same rendered prompt."""
    from tests.models.qwen_vl_checkpoints import IMAGE, write_qwen2_5_vl
    path = write_qwen2_5_vl(tmp_path_factory.mktemp("serve_qwen_vl"))
    image = random_images(1, seed=8)[0]
    with Server(path, "--max_seq_len", "256", "--max_num_tokens", "128",
                log_path=tmp_path_factory.mktemp("qwen_vl_log") / "server.log") as s:
        got = client(s).chat.completions.create(model="tiny", messages=image_message(data_url(png_bytes(image))),
                                                max_tokens=6, temperature=0.0)
    text = "<|im_start|>user\n" + IMAGE + "What is this?<|im_end|>\n<|im_start|>assistant\n"
    with LLM(model=str(path), dtype="float32") as llm:
        want = llm.generate({"prompt": text, "multi_modal_data": {"image": [image]}},
                            SamplingParams(max_tokens=6, temperature=0.0))
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_a_crowd_of_image_requests(llava_server):
    """20 chat requests at once, 0-2 of three base64 images each (the same image in several: encoded
    once, its blocks shared), whole and streamed, some clients dropping mid-stream, some with a
    corrupt image: each answered one gives its text alone, the bad get 400, and the server ends
    holding no request and no KV block."""
    import random

    from tests.serve.test_concurrent_mix import check_crowd
    rng = random.Random(3)
    urls = [data_url(png_bytes(a)) for a in random_images(3, seed=17)]
    corrupt = data_url(b"\x89PNG\r\n\x1a\n garbage")
    reqs = []
    for _ in range(20):
        picks = [rng.choice(urls) for _ in range(rng.randint(0, 2))]
        kind = "bad" if rng.random() < 0.1 else "ok"
        if kind == "bad":
            picks = picks[:1] + [corrupt]
        sampling = {"temperature": 0.0} if rng.random() < 0.5 else {"temperature": 0.9, "seed": rng.randint(0, 99)}
        body = {"model": "tiny", "messages": image_message(*picks, text=rng.choice(["What is this?", "Hi"])),
                "max_tokens": rng.randint(1, 10), "ignore_eos": True, "stream": rng.random() < 0.5, **sampling}
        if kind == "ok" and body["stream"] and rng.random() < 0.25:
            kind = "drop"
        reqs.append({"route": "/v1/chat/completions", "body": body, "kind": kind})
    assert {r["kind"] for r in reqs} == {"ok", "bad", "drop"}
    check_crowd(llava_server, reqs, "not a readable image")


def test_an_image_chat_to_an_adapter_runs_through_it(llava_dir, tmp_path):
    # the handler sent a chat with images without its lora_request: the base model's text under the
    # adapter's name, silently (and uncounted in /metrics)
    from tests.lora_adapters import write_adapter
    from trtllm import LoraConfig, LoRARequest
    write_adapter(llava_dir, tmp_path / "lm", targets=r".*language_model.*\.(q_proj|v_proj|down_proj)", seed=7,
                  model=hf_llava(llava_dir))
    image = random_images(1, seed=4)[0]
    messages = image_message(data_url(png_bytes(image)))
    with Server(llava_dir, "--lora_modules", f"lm={tmp_path / 'lm'}", "--max_seq_len", "256", "--max_num_tokens",
                "128", log_path=tmp_path / "server.log") as s:
        served = {m: client(s).chat.completions.create(model=m, messages=messages, max_tokens=6, temperature=0.0)
                  for m in ("tiny", "lm")}
        assert s.metrics()['trtllm_lora_requests_total{lora_name="lm"}'] == 1
    with LLM(model=str(llava_dir), dtype="float32", lora_config=LoraConfig(max_lora_rank=8)) as llm:
        text = llm.processor.get().apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
            add_generation_prompt=True).replace("<image>\n", "<image>")
        prompt = {"prompt": text, "multi_modal_data": {"image": [image]}}
        offline = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0),
                               lora_request=LoRARequest("lm", 1, str(tmp_path / "lm"))).outputs[0].text
    assert served["lm"].choices[0].message.content == offline != served["tiny"].choices[0].message.content

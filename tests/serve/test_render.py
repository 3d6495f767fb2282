"""The SSE chunk encoder's hand-written fast path writes exactly what json would."""
import json

import pytest

from trtllm.serve.render import Job, Renderer, dumps

TEXTS = ["", "plain", 'quote " and \\ backslash', "new\nline\ttab\r", "é中🙂", "\x00\x01\x1f", "</script>"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_fast_chunks_equal_json(endpoint, include_usage):
    render = Renderer(None, "m")
    job = Job(endpoint, "id-1", [("p", [1, 2])], [None], None, True, include_usage)
    encode = render.encoder(job)
    for index in (0, 7, 123):
        for text in TEXTS:
            if endpoint == "chat":
                choice = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            else:
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
            expected = b"data: " + dumps(render.chunk(job, choice, usage=None)) + b"\n\n"
            assert encode(choice) == expected
            assert json.loads(encode(choice)[6:])["choices"][0] == choice
    # the other shapes take json's own path
    done = {"index": 0, "text": "x", "logprobs": None, "finish_reason": "stop"} if endpoint == "completions" \
        else {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert json.loads(encode(done)[6:])["choices"][0] == done


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_ruled_out_tokens_logprob_is_written_as_valid_json(endpoint):
    # top_k=2 with logprobs=3: the third alternative's processed logprob is -inf, which json wrote as
    # -Infinity (not JSON: JSON.parse and strict clients refuse the body); vLLM's floor, -9999, instead
    render = Renderer(None, "m")
    job = Job(endpoint, "id-1", [("p", [1, 2])], [None], 3, False, False)
    body = dumps(render.logprobs(job, [7], [{7: -0.5, 8: -0.9, 9: float("-inf")}], 0)).decode()
    json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in {body}"))
    assert "-9999.0" in body


def test_chat_logprob_bytes_are_the_tokens_own(tmp_path):
    # a token holding part of a character decodes to U+FFFD: its bytes were U+FFFD's (EF BF BD), so a
    # client joining the tokens' bytes (what OpenAI's `bytes` is for) got no character back
    from transformers import AutoTokenizer

    from tests.runtime.tokenizers import make_tokenizer
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))  # byte-level BPE, as Llama 3's and Qwen's
    render = Renderer(tok, "m")
    job = Job("chat", "id-1", [("p", [1, 2])], [None], 1, False, False)
    text = "日本🙂 naïve"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # a character split across tokens
    content = render.logprobs(job, ids, [{t: -1.0, 5: -2.0} for t in ids], 0)["content"]
    assert b"".join(bytes(c["bytes"]) for c in content).decode() == text
    assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)


def test_logprob_tokens_keep_the_space_a_sentencepiece_word_starts_with(tmp_path):
    # "▁world" decoded alone is a text's first word, "world": joined, the tokens (chat's content,
    # completions' tokens) read "helloworld", and text_offset ran one short a word
    from transformers import AutoTokenizer

    from tests.runtime.tokenizers import make_tokenizer
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path, kind="metaspace"))  # Llama 2's, Mistral's kind
    render = Renderer(tok, "m")
    ids = tok.encode("hello world naïve fox", add_special_tokens=False)
    entries = [{t: -1.0} for t in ids]
    chat = render.logprobs(Job("chat", "c", [("p", [1])], [None], 0, False, False), ids, entries, 0)["content"]
    assert "".join(c["token"] for c in chat) == " hello world naïve fox"
    assert b"".join(bytes(c["bytes"]) for c in chat).decode() == " hello world naïve fox"
    completion = render.logprobs(Job("completions", "c", [("p", [1])], [None], 0, False, False), ids, entries, 0)
    assert "".join(completion["tokens"]) == " hello world naïve fox"
    assert completion["text_offset"] == [0, 6, 10, 11, 12, 18]


def test_text_offsets_count_a_split_character_once(tmp_path):
    # each token's own text was summed: a character split across two tokens counted a U+FFFD in each,
    # so every offset after it ran past the text
    from transformers import AutoTokenizer

    from tests.runtime.tokenizers import make_tokenizer
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))  # byte-level BPE
    render = Renderer(tok, "m")
    ids = tok.encode("日本🙂 ok", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    lp = render.logprobs(Job("completions", "c", [("p", [1])], [None], 0, False, False), ids, [{t: -1.0} for t in ids], 0)
    text = tok.decode(ids)
    starts = [text.index("🙂"), text.index(" ok"), text.index("ok"), text.index("k")]
    assert lp["text_offset"][-4:] == starts


def test_a_streams_text_offsets_count_text_held_back_when_its_tokens_went_out(tmp_path):
    # a chunk's offsets started from the text sent so far: a character (or a possible stop string)
    # still held back when its tokens went out made every offset of the next chunk run short
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tests.runtime.tokenizers import make_tokenizer
    from trtllm.serve.render import ChoiceProgress
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))  # byte-level BPE
    render = Renderer(tok, "m")
    job = Job("completions", "c", [("p", [1])], [None], 0, True, False)
    ids = tok.encode("日本🙂 ok fox", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:i]))  # inside a character
    whole = render.logprobs(job, ids, [{t: -1.0} for t in ids], 0)["text_offset"]
    state, got = ChoiceProgress(), []
    for end, text in [(cut, tok.decode(ids[:cut]).rstrip("\ufffd")), (len(ids), tok.decode(ids))]:
        c = SimpleNamespace(text=text, token_ids=ids[:end], logprobs=[{t: -1.0} for t in ids[:end]],
                            finish_reason="stop" if end == len(ids) else None)
        got += render.piece(job, state, c, 0)["logprobs"]["text_offset"]
    assert got == whole


@pytest.mark.parametrize("as_ids", [False, True])
def test_an_echoed_prompts_text_offsets_count_its_special_tokens(tmp_path, as_ids):
    # the echoed text shows a prompt's special tokens (as sent, or decoded with them) and so do its logprob
    # tokens, but their offsets were counted as the request's skip_special_tokens skips them: after
    # "<|im_end|>" every offset ran short of its token's place in the text
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tests.runtime.tokenizers import make_tokenizer
    from trtllm.sampling_params import SamplingParams
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))
    render = Renderer(tok, "m")
    sent = "<|im_start|>user Hello<|im_end|><|im_start|>ok"
    ids = tok.encode(sent, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    job = Job("completions", "c", [(None if as_ids else sent, ids)], [SamplingParams(max_tokens=1)], 0, False, False,
              echo=True)
    out = SimpleNamespace(prompt=None, prompt_logprobs=[None] + [{t: -1.0} for t in ids[1:]])
    text, lp = render.echoed(job, 0, out)
    assert text == sent
    assert all(text.startswith(token, at) for token, at in zip(lp["tokens"], lp["text_offset"])), lp

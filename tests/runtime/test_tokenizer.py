"""trtllm.runtime.tokenizer: loading, incremental detokenization, stop strings, chat."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.runtime.tokenizers import CHATML_TEMPLATE, byte_token_ids, make_tokenizer
from trtllm.runtime.output_builder import OutputBuilder
from trtllm.runtime.sequence import Sequence
from trtllm.runtime.tokenizer import (
    IncrementalDetokenizer,
    apply_chat_template,
    find_stop_span,
    load_tokenizer,
    safe_prefix_len,
)
from trtllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte_level": make_tokenizer(root / "byte_level", chat_template=CHATML_TEMPLATE),
        "metaspace": make_tokenizer(root / "metaspace", kind="metaspace"),
    }


@pytest.fixture(scope="module")
def bl(tok_dirs):
    return load_tokenizer(tok_dirs["byte_level"])


@pytest.fixture(scope="module")
def ms(tok_dirs):
    return load_tokenizer(tok_dirs["metaspace"])


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    """Feed output_ids one at a time; return (deltas, flushed tail, detokenizer)."""
    det = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [det.append(t) for t in output_ids]
    return deltas, det.flush(), det


# ---------------------------------------------------------------- load_tokenizer

def test_load_from_directory(tok_dirs, bl):
    ids = bl.encode("Hello 🙂")
    assert bl.decode(ids) == "Hello 🙂"
    assert bl.eos_token == "<|endoftext|>"


def test_load_passes_a_tokenizer_through(bl):
    assert load_tokenizer(bl) is bl


def test_load_missing_directory_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


def test_load_directory_without_tokenizer_names_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as e:
        load_tokenizer(str(tmp_path))
    assert "tokenizer.json" in str(e.value)


def test_load_broken_tokenizer_names_directory(tmp_path):
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- detokenizer

def test_split_emoji_never_streams_replacement_char(bl):
    prompt = bl.encode("Say:")
    out = bl.encode("ok ") + byte_token_ids(bl, "🙂") + bl.encode(" 日本") + byte_token_ids(bl, "é")
    deltas, tail, det = stream(bl, prompt, out)
    assert all("\ufffd" not in d for d in deltas)
    # the emoji's 4 byte-tokens: nothing for the first three, the whole character on the 4th
    emoji = deltas[len(bl.encode("ok ")):][:4]
    assert emoji == ["", "", "", "🙂"]
    assert tail == ""
    assert det.text == "".join(deltas) == "ok 🙂 日本é" == bl.decode(out)


def test_token_ending_inside_a_character_streams_what_precedes_it(bl):
    ids = bl.encode("日本語")
    assert bl.decode(ids[:1]) == "日\ufffd"  # "日" and the first byte of "本"
    deltas, tail, det = stream(bl, [], ids)
    assert deltas == ["日", "本", "語"] and tail == ""


def test_incomplete_character_at_the_end_is_flushed_as_decode_gives_it(bl):
    out = bl.encode("a") + byte_token_ids(bl, "🙂")[:2]
    deltas, tail, det = stream(bl, [], out)
    assert deltas == ["a", "", ""]
    assert tail == "\ufffd" and det.text == bl.decode(out) == "a\ufffd"


def test_an_aborted_request_keeps_the_text_of_its_unfinished_character(bl):
    """An abort ends a request as a length stop does: its last output's text is its tokens' (the
    held-back unfinished character flushed), streamed or not; it was dropped (found by the stress
    test, tests/runtime/test_stress_books.py)."""
    params = SamplingParams(max_tokens=8)
    out = bl.encode("a") + byte_token_ids(bl, "🙂")[:2]
    seq = Sequence("r", [5], params)
    req = OutputBuilder("r", None, [5], params, [seq], bl, [], 64, stream=True)
    for t in out:
        assert req.append(seq, t, None) is None
    assert req.emit(copy=True).outputs[0].text_diff == "a"
    req.abort()
    last = req.emit(copy=True)
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert last.outputs[0].text == bl.decode(out) == "a\ufffd" and last.outputs[0].text_diff == "\ufffd"


def test_prompt_ending_inside_a_character(bl):
    """Output completing a prompt's half character: decoded as the output alone."""
    emoji = byte_token_ids(bl, "🙂")
    out = emoji[2:] + bl.encode("x")
    deltas, tail, det = stream(bl, bl.encode("hi") + emoji[:2], out)
    assert det.text == bl.decode(out)


def test_special_tokens_skipped_or_kept(bl):
    eos = bl.eos_token_id
    out = bl.encode("Hi") + [eos] + bl.encode(" there")
    deltas, tail, det = stream(bl, [], out, skip_special_tokens=True)
    assert det.text == "Hi there" == bl.decode(out, skip_special_tokens=True)
    assert deltas[len(bl.encode("Hi"))] == ""  # the skipped eos adds nothing
    deltas, tail, det = stream(bl, [], out, skip_special_tokens=False)
    assert det.text == "Hi<|endoftext|> there" == bl.decode(out, skip_special_tokens=False)


def test_sentencepiece_leading_space_kept_with_prompt_context(ms):
    prompt = ms.encode("Hello")
    out = ms.encode("world, hello there")  # first token "▁world"
    assert ms.convert_ids_to_tokens(out[:1])[0].startswith("▁")
    deltas, tail, det = stream(ms, prompt, out)
    # decoded alone the first token would lose its space ("world, ..."): prompt + text
    # must read "Hello world, ...", as decoding prompt and output together does.
    assert deltas[0].startswith(" ")
    assert det.text == " world, hello there"
    full = ms.decode(prompt + out)
    assert full == "Hello" + det.text
    # with no prompt there is no context: exactly decode(output)
    assert stream(ms, [], out)[2].text == ms.decode(out) == "world, hello there"


def test_sentencepiece_spaces_inside_output(ms):
    out = ms.encode("The quick brown fox jumps")
    deltas, _, det = stream(ms, ms.encode("Go:"), out)
    assert "".join(deltas) == " The quick brown fox jumps"
    assert all(d for d in deltas)  # every word token streams at once


# Random output ids (every byte is a token, so splits of "é", "日本", "🙂" abound;
# special tokens too) must stream to exactly what decode gives for the whole.
_PROPERTY = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPERTY
@given(data=st.data(), skip=st.booleans())
def test_property_byte_level_deltas_concatenate_to_decode(bl, data, skip):
    ids = st.integers(0, len(bl) - 1)
    # mostly ordinary tokens, plus the byte splits of multi-byte characters
    pieces = st.lists(st.one_of(ids.map(lambda i: [i]),
                                st.sampled_from(["é", "日本", "🙂", " 🎉"]).map(
                                    lambda s: byte_token_ids(bl, s))), max_size=24)
    out = [i for piece in data.draw(pieces, "output") for i in piece]
    prompt = data.draw(st.lists(ids, max_size=8), "prompt")
    deltas, tail, det = stream(bl, prompt, out, skip)
    assert "".join(deltas) + tail == det.text == bl.decode(out, skip_special_tokens=skip)
    # nothing held back but an unfinished last character
    assert tail.strip("\ufffd") == ""


@_PROPERTY
@given(data=st.data())
def test_property_metaspace_deltas_extend_the_prompt(ms, data):
    ids = st.integers(0, len(ms) - 1)
    prompt = data.draw(st.lists(ids, min_size=1, max_size=8), "prompt")
    out = data.draw(st.lists(ids, max_size=24), "output")
    deltas, tail, det = stream(ms, prompt, out)
    assert tail == ""
    full, before = ms.decode(prompt + out, skip_special_tokens=True), ms.decode(prompt, skip_special_tokens=True)
    assert full.startswith(before)
    assert det.text == full[len(before):]


# ---------------------------------------------------------------- stop strings

def find_stop(text: str, stop: list[str], start: int) -> int | None:
    """Where the earliest stop string begins, as the engine reads find_stop_span."""
    span = find_stop_span(text, stop, start)
    return None if span is None else span[0]


def test_find_stop_earliest_and_only_new_region():
    text = "abc STOP def END"
    assert find_stop(text, ["END", "STOP"], start=0) == 4
    assert find_stop(text, ["END"], start=len(text) - 1) == 13  # match ends in new text
    assert find_stop(text, ["STOP"], start=10) is None  # ended before start: seen already
    assert find_stop(text, ["xyz"], start=0) is None
    assert find_stop(text, [], start=0) is None
    # straddling old and new text
    assert find_stop("hello wor" + "ld", ["world"], start=9) == 6


def test_find_stop_span_shortest_at_same_start():
    assert find_stop_span("say abcd", ["abcd", "ab"], start=0) == (4, 6)
    assert find_stop_span("x\n\nY", ["\n\n", "Y"], start=0) == (1, 3)


def test_safe_prefix_len_holds_back_a_possible_stop():
    assert safe_prefix_len("Hello wor", ["world"]) == 6
    assert safe_prefix_len("Hello w", ["world", "wow"]) == 6
    assert safe_prefix_len("Hello", ["world"]) == 5
    assert safe_prefix_len("Hello", []) == 5
    assert safe_prefix_len("aaa", ["aab"]) == 1  # hold "aa"
    assert safe_prefix_len("", ["x"]) == 0


def test_streaming_never_sends_text_that_becomes_a_stop_string(bl):
    """Stream "The answer is 42.\\n\\nUser:" with stop "\\n\\nUser:", token by token."""
    stop = ["\n\nUser:"]
    out = bl.encode("The answer is 42.\n\nUser: more")
    det = IncrementalDetokenizer(bl, [])
    sent, finished = "", None
    for t in out:
        start = len(det.text)
        det.append(t)
        pos = find_stop(det.text, stop, start)
        if pos is not None:
            finished = det.text[:pos]
            break
        safe = safe_prefix_len(det.text, stop)
        assert safe >= len(sent)  # never takes back what was sent
        sent = det.text[:safe]
        assert "\n" not in sent
    assert finished == "The answer is 42."
    assert sent == "The answer is 42."


# ---------------------------------------------------------------- chat templates

def test_chat_template_uses_the_tokenizers_own(bl):
    messages = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(bl, messages) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(bl, messages, add_generation_prompt=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"


def test_no_chat_template_is_a_clear_error(ms):
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(ms, [{"role": "user", "content": "hi"}])


def test_request_supplied_template_refused(bl):
    with pytest.raises(TypeError):
        apply_chat_template(bl, [{"role": "user", "content": "hi"}], chat_template="{{ 1 }}")

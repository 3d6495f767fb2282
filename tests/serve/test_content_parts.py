"""serve/content_parts.py: the walk over a chat message's content parts, without a server."""
import pytest

from trtllm.serve.content_parts import TextPart, image_urls, template_content
from trtllm.serve.errors import RequestError


def _parts(*parts: dict) -> list[TextPart]:
    return [TextPart(**p) for p in parts]


def test_text_and_image_parts_become_the_template_text_in_order():
    content = _parts({"type": "text", "text": "look: "}, {"type": "image_url", "image_url": {"url": "data:a"}},
                     {"type": "text", "text": " and "}, {"type": "image_url", "image_url": "data:b"})
    assert template_content(content, "<image>") == "look: <image> and <image>"
    assert template_content("plain", None) == "plain" and template_content(None) is None
    assert image_urls(["plain", content, None, _parts({"type": "image_url", "image_url": {"url": "c"}})]) \
        == ["data:a", "data:b", "c"]


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "data:a"}}, "this model takes no images"),
    ({"type": "input_audio", "input_audio": {}}, "only text and image_url content parts are supported"),
    # a text part without its text is a text part: said so (it was told only text parts are supported)
    ({"type": "text"}, "a text content part needs its text"),
    ({"type": "text", "text": None}, "a text content part needs its text"),
])
def test_a_part_the_model_cannot_take_is_refused_by_name(part, message):
    with pytest.raises(RequestError, match=message) as e:
        template_content(_parts(part), None)
    assert e.value.status == 400 and e.value.param == "messages"

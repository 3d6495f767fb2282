"""OpenAI chat content parts: a message's `content` is a string or a list of parts,

    {"type": "text", "text": ...}    {"type": "image_url", "image_url": {"url": ...}}

`template_content` walks a message's parts into the text its chat template renders (an image
part becomes the model's image placeholder, which its processor expands, in the part's place);
`image_urls` walks a request's messages for their images' URLs, in message and part order
(decoded under the operator's policy by serve/media.py). Any other part is refused by name.
"""
from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from trtllm.serve.errors import RequestError


class TextPart(BaseModel):
    """A content part: {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}."""
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: dict | str | None = None

    @property
    def url(self):
        return self.image_url.get("url") if isinstance(self.image_url, dict) else self.image_url


def template_content(content: str | list[TextPart] | None, image_token: str | None = None) -> str | None:
    """A message's content for the chat template; an image part becomes `image_token` (None: this
    model takes no images, and an image part is refused)."""
    if isinstance(content, list):
        pieces = []
        for part in content:
            if part.type == "text":
                if part.text is None:
                    raise RequestError(400, "messages: a text content part needs its text ({\"type\": \"text\", "
                                            "\"text\": ...})", param="messages")
                pieces.append(part.text)
            elif part.type == "image_url":
                if image_token is None:
                    raise RequestError(400, "messages: an image_url content part, but this model takes no "
                                            "images (a text-only model)", param="messages")
                pieces.append(image_token)
            else:
                raise RequestError(400, "messages: only text and image_url content parts are supported",
                                   param="messages")
        content = "".join(pieces)
    return content


def image_urls(contents: Iterable[str | list[TextPart] | None]) -> list:
    """The image_url parts' URLs of these messages' contents, in message and part order."""
    return [part.url for content in contents if isinstance(content, list)
            for part in content if part.type == "image_url"]

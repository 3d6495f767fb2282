"""Images in chat requests: `{"type": "image_url", "image_url": {"url": ...}}` content parts to
PIL images, under the operator's policy.

- `data:image/<png|jpeg|...>;base64,...`: decoded in memory;
- `http://`, `https://`: refused (400). The server never reaches other hosts for a request:
  a URL would let any client make it fetch from the server's network (SSRF);
- `file://PATH` or a plain path: only under `--allowed_local_media_path` (the real path, links
  resolved, must lie inside it), else refused (403); off by default.

Caps: at most `max_images` images per request (400); an image's decoded size is read from its
header before any pixel is decoded, and one of more than `max_pixels` pixels is refused (413),
so a decompression bomb (a small PNG of 100k x 100k pixels) never reaches memory. An image PIL
cannot decode is refused (400) naming its part.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from trtllm.runtime.multimodal_inputs import MAX_IMAGE_PIXELS, MAX_IMAGES_PER_REQUEST
from trtllm.serve.errors import RequestError

_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: str | None = None  # a directory; None: no local files
    max_images: int = MAX_IMAGES_PER_REQUEST
    max_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.max_images < 0 or self.max_pixels < 1:
            raise ValueError(f"max_images {self.max_images} / max_pixels {self.max_pixels}: must be >= 0 / >= 1")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ValueError(f"--allowed_local_media_path {self.allowed_local_media_path!r} is not a directory")


async def process_images(processor, text: str, urls: list[str], policy: MediaPolicy):
    """A chat prompt's images decoded (under the policy's caps) and, with its text, through the
    model's processor, both off the event loop: (text with the image placeholders expanded,
    token ids, the engine's multimodal input; runtime/multimodal_inputs.py)."""
    images = await asyncio.to_thread(load_images, urls, policy)
    try:
        return await asyncio.to_thread(processor.process, {"prompt": text, "multi_modal_data": {"image": images}})
    except ValueError as e:
        raise RequestError(400, f"messages: {e}", param="messages") from None


def load_images(urls: list[str], policy: MediaPolicy) -> list:
    if len(urls) > policy.max_images:
        raise RequestError(400, f"messages: {len(urls)} images in one request; this server takes at most "
                                f"{policy.max_images}", param="messages")
    return [load_image(url, i, policy) for i, url in enumerate(urls)]


def load_image(url: str, index: int, policy: MediaPolicy):
    what = f"messages: image {index}"
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{what}: image_url.url must be a non-empty string", param="messages")
    scheme = urlparse(url).scheme.lower() if not url.startswith("data:") else "data"
    if scheme == "data":
        match = _DATA_URL.match(url)
        if match is None:
            raise RequestError(400, f"{what}: a data URL must be data:image/<type>;base64,<data>", param="messages")
        try:
            data = base64.b64decode(url[match.end():], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{what}: the data URL's base64 is not valid", param="messages") from None
        source = io.BytesIO(data)
    elif scheme in ("http", "https"):
        raise RequestError(400, f"{what}: remote image URLs are not fetched (this server makes no outbound "
                                "requests); send the image inline as a data:image/...;base64 URL", param="messages")
    elif scheme in ("file", ""):
        source = _local_file(unquote(urlparse(url).path) if scheme == "file" else url, what, policy)
    else:
        raise RequestError(400, f"{what}: URL scheme {scheme!r} is not supported (data:, or file: under "
                                "--allowed_local_media_path)", param="messages")
    return _decode(source, what, policy)


def _local_file(path: str, what: str, policy: MediaPolicy):
    root = policy.allowed_local_media_path
    if root is None:
        raise RequestError(403, f"{what}: local files are not served (the operator sets --allowed_local_media_path "
                                "to allow a directory)", param="messages")
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise RequestError(403, f"{what}: {path!r} is outside --allowed_local_media_path", param="messages")
    if not os.path.isfile(real):
        raise RequestError(400, f"{what}: {path!r} is not a file", param="messages")
    return real


def _decode(source, what: str, policy: MediaPolicy):
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise RequestError(400, f"{what}: images need Pillow on the server (pip install trtllm[multimodal])",
                           param="messages") from None
    try:
        image = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own cap, past twice Image.MAX_IMAGE_PIXELS
        raise RequestError(413, f"{what}: more than the {policy.max_pixels} pixels this server decodes ({e})",
                           param="messages") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RequestError(400, f"{what}: not a readable image ({type(e).__name__})", param="messages") from None
    w, h = image.size
    if w * h > policy.max_pixels:
        raise RequestError(413, f"{what}: {w}x{h} pixels, more than the {policy.max_pixels} this server decodes",
                           param="messages")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"{what}: the image is corrupt ({type(e).__name__}: {e})", param="messages") from None
    return image  # its mode as decoded: check_image converts it (a 16-bit PNG scaled, not clipped at 255)

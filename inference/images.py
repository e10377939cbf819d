"""Key-image preparation that matches BiMediX2's training: pad to a square with the CLIP mean colour.

LLaVA-1.5 (``image_aspect_ratio: pad``) expands every image to a square whose background is the
CLIP image mean (0.48145466, 0.4578275, 0.40821073) x 255, centred, before the CLIP processor
resizes to 336 px; no tiling. Pure functions: bytes in, images or digests out.
"""

from __future__ import annotations

import base64
import hashlib
import io

from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB: tuple[int, int, int] = (int(CLIP_MEAN[0] * 255), int(CLIP_MEAN[1] * 255), int(CLIP_MEAN[2] * 255))


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG bytes to an RGB image; ValueError with the reason when it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"key image is not a decodable PNG/JPEG ({len(data)} bytes): {err}") from err


def pad_to_square(img: Image.Image, background: tuple[int, int, int] = CLIP_MEAN_RGB) -> Image.Image:
    """Centre ``img`` on a square canvas of its longer side, filled with ``background``."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sniff_mime(data: bytes) -> str:
    """MIME type of encoded image bytes, for data URLs."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    raise ValueError("key image is neither PNG nor JPEG")


def to_data_url(data: bytes) -> str:
    return f"data:{sniff_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def from_data_url(url: str) -> bytes:
    """Bytes of a ``data:image/...;base64,`` URL; ValueError for anything else (no remote fetches)."""
    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError("only base64 data URLs of images are accepted")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except ValueError as err:
        raise ValueError(f"image data URL is not valid base64: {err}") from err

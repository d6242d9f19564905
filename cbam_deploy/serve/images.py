"""Image bytes from a request -> the model's input, with the size checked before any pixel is decoded.

Runs on a worker thread (never on the event loop). The header is read first: more than
``max_pixels`` is 413, an aspect ratio beyond 1:``max_aspect`` (or a zero side) is 422, and only
then is the image decoded; ``preprocess_image`` bounds the rest by the output size.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..data import preprocess_image
from .protocol import ProtocolError

# Formats the server decodes; others (EPS, which would call Ghostscript, PSD, ...) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")


def decode_image(data: bytes, spec: dict, max_pixels: int, max_aspect: float) -> np.ndarray:
    """Preprocessed CHW float32 from encoded image bytes, or a ProtocolError (413, 415 or 422)."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ProtocolError(f"the image has more pixels than the limit ({max_pixels:,})", 413) from None
    except Exception:  # a decoder can raise almost anything on hostile bytes
        raise ProtocolError(f"the body is not a decodable image ({', '.join(IMAGE_FORMATS)})", 415) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ProtocolError(f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}", 413)
        if min(width, height) < 1 or max(width, height) > max_aspect * min(width, height):
            raise ProtocolError(f"the image is {width}x{height}: an aspect ratio beyond 1:{max_aspect:g} is refused", 422)
        try:
            image.load()
        except Exception:
            raise ProtocolError("the image data is truncated or corrupt", 415) from None
        return preprocess_image(image, spec)

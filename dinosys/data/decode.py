"""Image decoding that survives web data: typed rejections, bomb checks before decoding, fast JPEG.

``probe_image`` reads only the header (format, size, EXIF orientation) so that callers can plan
crops and reject decompression bombs before any pixel is decoded. ``decode_image`` then decodes,
optionally at a reduced size (JPEG DCT scaling via simplejpeg or ``Image.draft``), applies the EXIF
orientation and converts every mode (palette, alpha, 16-bit, CMYK, ...) to 8-bit RGB.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

try:  # optional fast JPEG decoder (libjpeg-turbo)
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None

# Truncated files must fail loudly instead of being grey-filled.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> PIL transpose method (same table as PIL.ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
BAD_REASONS = ("empty", "not_image", "too_large", "truncated", "corrupt", "no_image_field",
               "read_error", "no_text", "bad_text")  # the last two: image-text training


class BadImageError(Exception):
    """A sample that cannot be turned into an image; ``reason`` is a short code (BAD_REASONS)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: displayed size (after EXIF orientation), format, orientation."""

    width: int
    height: int
    format: str
    orientation: int
    mode: str

    @property
    def swaps_axes(self) -> bool:
        """True when the stored pixels are transposed relative to the displayed image."""
        return self.orientation in (5, 6, 7, 8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError("too_large", str(exc).split(".")[0]) from exc
    except UnidentifiedImageError as exc:
        raise BadImageError("not_image", "unrecognised format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError("corrupt", str(exc)[:80]) from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError("corrupt", f"size {w}x{h}")
    if w * h > max_pixels:
        raise BadImageError("too_large", f"{w}x{h} > {max_pixels} pixels")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF blocks are common on the web; ignore the tag
        return 1
    return value if 1 <= value <= 8 else 1


def probe_image(data: bytes, max_pixels: int) -> ImageHeader:
    """Read the header only; raise BadImageError for empty, non-image or oversized data."""
    img = _open(data, max_pixels)
    orientation = _orientation(img)
    w, h = img.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageHeader(w, h, img.format or "", orientation, img.mode)


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        # 16-bit PNG/TIFF grey: keep the top byte (65535 -> 255), not a clip at 255.
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8) if arr.max(initial=0) > 255 else \
            arr.astype(np.uint8)
    return Image.fromarray(arr8, "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _sixteen_bit_to_rgb(img)
    return img.convert("RGB")  # L, 1, CMYK (PIL handles Adobe-inverted CMYK), YCbCr, LAB, HSV


def reduced_size_hint(header: ImageHeader, draft_size: tuple[int, int] | None
                      ) -> tuple[int, int] | None:
    """The stored-orientation (min_width, min_height) a reduced decode must keep, or None."""
    if draft_size is None:
        return None
    min_w, min_h = int(math.ceil(draft_size[0])), int(math.ceil(draft_size[1]))
    if min_w >= header.width and min_h >= header.height:
        return None
    return (min_h, min_w) if header.swaps_axes else (min_w, min_h)


def _decode_simplejpeg(data: bytes, hint: tuple[int, int] | None) -> np.ndarray:
    min_w, min_h = hint if hint is not None else (0, 0)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w,
                                      strict=True)
    except ValueError as exc:
        text = str(exc).lower()
        reason = "truncated" if ("premature" in text or "truncat" in text) else "corrupt"
        raise BadImageError(reason, str(exc)[:80]) from exc


def _decode_pil(img: Image.Image, hint: tuple[int, int] | None) -> Image.Image:
    if hint is not None and img.format == "JPEG":
        img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, hint)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc).lower()
        reason = "truncated" if "truncat" in text or "premature" in text else "corrupt"
        raise BadImageError(reason, str(exc)[:80]) from exc
    return to_rgb(img)


def decode_array(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None,
                 decoder: str = "auto", header: ImageHeader | None = None) -> np.ndarray:
    """Like :func:`decode_image` but returns a writable uint8 (H, W, 3) array (no extra copy)."""
    img = _open(data, max_pixels)
    if header is None:
        orientation = _orientation(img)
        w, h = img.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        header = ImageHeader(w, h, img.format or "", orientation, img.mode)
    hint = reduced_size_hint(header, draft_size)
    method = _TRANSPOSE.get(header.orientation)
    if (decoder in ("auto", "simplejpeg") and simplejpeg is not None
            and header.format == "JPEG" and header.mode in ("RGB", "L")):
        arr = _decode_simplejpeg(data, hint)
        if method is None:
            return arr
        out = Image.fromarray(arr).transpose(method)
    else:
        out = _decode_pil(img, hint)
        if method is not None:
            out = out.transpose(method)
    return np.array(out, dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None,
                 decoder: str = "auto", header: ImageHeader | None = None) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB PIL image in displayed orientation.

    ``draft_size=(w, h)``: the caller needs at least this displayed size, so a JPEG may be decoded
    at a reduced scale (1/8 steps with simplejpeg, 1/2^k with Pillow). ``decoder``: auto,
    simplejpeg or pil. Raises BadImageError(reason) with reason in BAD_REASONS; the pixel limit
    ``max_pixels`` is checked on the header before decoding.
    """
    return Image.fromarray(decode_array(data, max_pixels, draft_size, decoder, header), "RGB")

"""decode_image on real photos and every bad kind: typed rejections, correct conversions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from data_helpers import bomb_png, jpeg_bytes
from PIL import Image

from dinosys.data.decode import BadImageError, decode_image, probe_image

LIMIT = 89_478_485
DECODERS = ("auto", "pil")


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("name", ["empty", "truncated_jpeg", "text_as_jpg", "bomb_png"])
def test_bad_kinds_raise_typed_reason(sample_kinds: dict, name: str, decoder: str) -> None:
    kind = sample_kinds[name]
    with pytest.raises(BadImageError) as info:
        decode_image(kind["data"], LIMIT, decoder=decoder)
    assert info.value.reason == kind["reason"]


def test_truncated_jpeg_is_not_grey_filled(photos: list[np.ndarray]) -> None:
    data = jpeg_bytes(photos[1])
    for cut in (0.3, 0.6, 0.9):
        for decoder in DECODERS:
            with pytest.raises(BadImageError) as info:
                decode_image(data[: int(len(data) * cut)], LIMIT, decoder=decoder)
            assert info.value.reason == "truncated"


def test_pixel_limit_checked_on_header_before_decoding(photos: list[np.ndarray]) -> None:
    data = jpeg_bytes(photos[0])
    h, w = photos[0].shape[:2]
    assert probe_image(data, LIMIT).width == w
    with pytest.raises(BadImageError) as info:
        decode_image(data, max_pixels=w * h - 1)
    assert info.value.reason == "too_large"
    # a header claiming 100000 x 100000 is rejected by probing alone (no pixel data exists)
    with pytest.raises(BadImageError) as info:
        probe_image(bomb_png(), LIMIT)
    assert info.value.reason == "too_large"
    with pytest.raises(BadImageError) as info:  # 4e8 pixels: under Pillow's bomb error, over ours
        probe_image(bomb_png(20_000, 20_000), 10**6)
    assert info.value.reason == "too_large"


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()) < tol


@pytest.mark.parametrize("decoder", DECODERS)
def test_good_jpeg_and_exif_orientation(sample_kinds: dict, decoder: str) -> None:
    ref = sample_kinds["good_jpeg"]["ref"]
    img = decode_image(sample_kinds["good_jpeg"]["data"], LIMIT, decoder=decoder)
    assert img.mode == "RGB" and img.size == (ref.shape[1], ref.shape[0])
    assert _close(np.asarray(img), ref, 4.0)
    rotated = sample_kinds["exif_rotated"]
    header = probe_image(rotated["data"], LIMIT)
    assert header.orientation == 6 and (header.width, header.height) == (96, 72)
    out = np.asarray(decode_image(rotated["data"], LIMIT, decoder=decoder))
    assert out.shape == ref.shape  # displayed orientation: 96 wide, 72 high
    assert _close(out, ref, 4.0)
    assert not _close(np.ascontiguousarray(out[::-1, ::-1]), ref, 8.0)  # really oriented


@pytest.mark.parametrize("decoder", DECODERS)
def test_alpha_palette_16bit_cmyk_converted(sample_kinds: dict, decoder: str) -> None:
    rgba = sample_kinds["png_rgba"]
    out = np.asarray(decode_image(rgba["data"], LIMIT, decoder=decoder))
    assert out.shape == rgba["ref"].shape
    assert (out[:, : rgba["white_cols"]] == 255).all()  # transparent -> white, not black
    assert np.array_equal(out[:, rgba["white_cols"]:], rgba["ref"][:, rgba["white_cols"]:])

    pal = np.asarray(decode_image(sample_kinds["png_palette"]["data"], LIMIT, decoder=decoder))
    assert pal.shape == rgba["ref"].shape and pal.dtype == np.uint8
    assert (pal == 255).all(axis=2).sum() > 0  # palette index 0 is transparent -> white

    g16 = sample_kinds["png_16bit"]
    assert Image.open(io.BytesIO(g16["data"])).mode.startswith("I")
    out16 = np.asarray(decode_image(g16["data"], LIMIT, decoder=decoder))
    assert np.array_equal(out16[..., 0], g16["ref_gray"])  # scaled, not clipped at 255
    assert out16[..., 0].max() < 255 or g16["ref_gray"].max() == 255

    cmyk = sample_kinds["cmyk_jpeg"]
    assert Image.open(io.BytesIO(cmyk["data"])).mode == "CMYK"
    out_cmyk = np.asarray(decode_image(cmyk["data"], LIMIT, decoder=decoder))
    assert out_cmyk.shape == cmyk["ref"].shape
    assert _close(out_cmyk, cmyk["ref"], 6.0)  # colours right (not inverted)


def test_reduced_size_decode(photos: list[np.ndarray]) -> None:
    big = np.asarray(Image.fromarray(photos[0]).resize((1024, 768)))
    data = jpeg_bytes(big)
    for decoder in DECODERS:
        img = decode_image(data, LIMIT, draft_size=(300, 200), decoder=decoder)
        assert 300 <= img.width < 1024 and 200 <= img.height < 768, (decoder, img.size)
        full = np.asarray(Image.fromarray(big).resize(img.size, Image.Resampling.BOX))
        assert _close(np.asarray(img), full, 6.0)
    assert decode_image(data, LIMIT, draft_size=(1024, 768)).size == (1024, 768)

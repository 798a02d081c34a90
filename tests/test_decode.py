"""decode_image on files built in memory with Pillow: modes, orientation, frames, rejections."""

import io

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image, ImageFile

from analysis.data.decode import ImageRejected, decode_image

RNG = np.random.default_rng(0)
COLOURS = np.array(  # 2 x 3, every pixel different
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [40, 80, 120]]],
    dtype=np.uint8,
)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous and out.flags.writeable
    return out


def gray(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.uint8)
    return np.repeat(v[..., None], 3, axis=-1)


def test_rgb_png_exact_and_jpeg_close():
    noise = RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    assert_array_equal(decode(encode(Image.fromarray(noise), "PNG")), noise)
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[..., 0] = np.linspace(0, 255, 48, dtype=np.uint8)
    smooth[..., 1] = 128
    got = decode(encode(Image.fromarray(smooth), "JPEG", quality=95))
    assert got.shape == smooth.shape
    assert_allclose(got.astype(float), smooth.astype(float), atol=6)


EXPECTED_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated: turn 90 degrees clockwise to show upright
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_applied_exactly(fmt, orientation):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(Image.fromarray(COLOURS), fmt, exif=exif(orientation), **kw)
    assert_array_equal(decode(data), EXPECTED_ORIENTATION[orientation](COLOURS))


def test_exif_orientation_on_jpeg():
    blocks = COLOURS.repeat(8, axis=0).repeat(8, axis=1)  # 16 x 24: one 8x8 block per colour
    data = encode(Image.fromarray(blocks), "JPEG", quality=95, subsampling=0, exif=exif(6))
    got = decode(data)
    assert got.shape == (24, 16, 3)
    centres = got[4::8, 4::8].astype(float)
    assert_allclose(centres, np.rot90(COLOURS, -1).astype(float), atol=12)


def test_grayscale_and_bilevel():
    ramp = np.arange(0, 256, 16, dtype=np.uint8).reshape(2, 8)
    assert_array_equal(decode(encode(Image.fromarray(ramp), "PNG")), gray(ramp))
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    one = Image.fromarray(bits).convert("1")
    assert one.mode == "1"
    assert_array_equal(decode(encode(one, "PNG")), gray(bits * 255))


def palette_image(indices) -> Image.Image:
    im = Image.fromarray(np.asarray(indices, np.uint8), "P")
    im.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0])
    return im


def test_palette_with_and_without_transparency():
    idx = [[0, 1, 2], [2, 1, 0]]
    pal = np.array([[10, 20, 30], [200, 100, 0], [0, 0, 0]], np.uint8)
    assert_array_equal(decode(encode(palette_image(idx), "PNG")), pal[idx])
    # index 2 (black) fully transparent: white, not black
    white = pal.copy()
    white[2] = 255
    assert_array_equal(decode(encode(palette_image(idx), "PNG", transparency=2)), white[idx])
    # per-entry alpha: index 1 at alpha 128
    half = pal.copy()
    half[1] = np.rint(pal[1].astype(float) * 128 / 255 + 255 * 127 / 255)  # 227, 177, 127
    data = encode(palette_image(idx), "PNG", transparency=bytes([255, 128, 255]))
    assert_array_equal(decode(data), half[idx])


def test_rgba_composited_over_white():
    rgba = np.array(
        [[[200, 50, 0, 100], [0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8
    )
    got = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    a = rgba[..., 3:] / 255
    expected = np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    assert_array_equal(got, expected)
    assert_array_equal(got[0, 0], [233, 175, 155])  # 200*100/255 + 155 = 233.4; 174.6; 155
    assert_array_equal(got[0, 1], [255, 255, 255])  # transparent black is white
    assert_array_equal(got[0, 3], [127, 127, 127])


def test_la_and_rgb_colour_key_composited_over_white():
    la = np.array([[[0, 0], [100, 255], [0, 128]]], np.uint8)
    assert_array_equal(decode(encode(Image.fromarray(la, "LA"), "PNG")), gray([[255, 100, 127]]))
    keyed = encode(Image.fromarray(COLOURS), "PNG", transparency=(0, 255, 0))
    expected = COLOURS.copy()
    expected[0, 1] = 255
    assert_array_equal(decode(keyed), expected)


def test_cmyk_uses_pillows_conversion():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    got = decode(encode(cmyk, "JPEG", quality=95))
    assert_allclose(got.astype(float), np.full((16, 16, 3), [255, 0, 0], float), atol=4)
    mixed = Image.new("CMYK", (2, 2), (30, 128, 200, 64))
    assert_array_equal(decode(encode(mixed, "TIFF")), np.asarray(mixed.convert("RGB")))


def test_16_bit_scaled_by_bit_depth():
    values = np.array([[0, 256, 4000, 65535]], np.uint16)
    expected = gray([[0, 1, 15, 255]])
    png = Image.open(io.BytesIO(encode(Image.fromarray(values), "PNG")))
    assert png.mode == "I;16"
    assert_array_equal(decode(encode(Image.fromarray(values), "PNG")), expected)
    assert_array_equal(decode(encode(Image.fromarray(values), "TIFF")), expected)
    # 16-bit PGM opens as mode "I" (0..65535)
    pgm = b"P5\n4 1\n65535\n" + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert_array_equal(decode(pgm), expected)


def test_signed_32_bit_tiff_keeps_non_negative_half():
    values = np.array([[-5, 0, 1 << 24, (1 << 31) - 1]], np.int32)
    assert_array_equal(decode(encode(Image.fromarray(values), "TIFF")), gray([[0, 0, 2, 255]]))


def test_float_read_as_0_to_255_and_clipped():
    values = np.array([[-5.0, 0.6, 127.9, 300.0, np.nan]], np.float32)
    got = decode(encode(Image.fromarray(values, "F"), "TIFF"))
    assert_array_equal(got, gray([[0, 0, 127, 255, 0]]))


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 3), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert_array_equal(decode(data), np.full((3, 4, 3), [255, 0, 0], np.uint8))


def test_multipage_tiff_gives_first_page():
    first, second = Image.fromarray(COLOURS), Image.new("RGB", (5, 7), (9, 9, 9))
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert_array_equal(decode(data), COLOURS)


def test_unsupported_mode_rejected():
    with pytest.raises(ImageRejected) as e:
        decode_image(encode(Image.new("LAB", (2, 2)), "TIFF"))
    assert e.value.reason == "unsupported mode: LAB"


def noise_png() -> bytes:
    return encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


def noise_jpeg() -> bytes:
    noise = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG", quality=90)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (np.random.default_rng(1).bytes(1000), "not an image"),
        (b"This is a text file, not a picture.\nSecond line.\n", "not an image"),
        (noise_png()[: len(noise_png()) // 2], "truncated or corrupt: "),
        (noise_jpeg()[: len(noise_jpeg()) // 2], "truncated or corrupt: "),
    ],
    ids=["empty", "random", "text", "half-png", "half-jpeg"],
)
def test_rejections_with_reasons(data, reason):
    with pytest.raises(ImageRejected) as e:
        decode_image(data)
    assert isinstance(e.value, ValueError)
    assert e.value.reason.startswith(reason) and str(e.value) == e.value.reason
    if reason.endswith(": "):
        assert len(e.value.reason) > len(reason)  # Pillow's message is kept


def test_corrupt_png_data_rejected():
    data = bytearray(noise_png())
    data[200:260] = bytes(60)  # inside IDAT: the chunk checksum no longer matches
    with pytest.raises(ImageRejected) as e:
        decode_image(bytes(data))
    assert e.value.reason.startswith("truncated or corrupt: ")


def test_too_large_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # > 2x this raises in Pillow
    with pytest.raises(ImageRejected) as e:
        decode_image(encode(Image.new("RGB", (30, 30)), "PNG"))
    assert e.value.reason.startswith("too large: ")


def test_truncated_images_not_tolerated_globally():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

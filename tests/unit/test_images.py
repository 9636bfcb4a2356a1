"""to_native: every image mode and size ends as 80x60 RGB uint8, letterboxed on white."""

import io

import numpy as np
import pytest
from PIL import Image

from fashion_lightning.data.images import NATIVE_HW, ImageDecodeError, to_native


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_16_bit_greyscale_keeps_its_tones():
    ramp = np.linspace(0, 65535, 80 * 60).reshape(80, 60).astype(np.uint16)
    out = to_native(_encode(Image.fromarray(ramp)))
    assert out.shape == (*NATIVE_HW, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155  # not clipped to white


def test_transparent_background_becomes_white_and_aspect_is_kept():
    rgba = np.zeros((40, 120, 4), np.uint8)
    rgba[10:30, 40:80] = (255, 0, 0, 255)  # opaque red block on a transparent wide canvas
    out = to_native(_encode(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (*NATIVE_HW, 3)
    assert (out[0] == 255).all() and (out[-1] == 255).all()  # letterbox bars and transparency are white
    assert (out[:, :, 0] > 200).all() and (out[:, :, 1] < 60).sum() > 20  # the red block survived


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA"])
def test_other_modes_decode_to_rgb(mode):
    img = Image.new("RGB", (60, 80), (30, 120, 200)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out = to_native(_encode(img, fmt))
    assert out.shape == (*NATIVE_HW, 3) and out.dtype == np.uint8


def test_text_file_is_refused_with_the_reason():
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        to_native(b"styles.csv is not a photo")

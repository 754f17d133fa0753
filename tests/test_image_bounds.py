"""Work on an image is bounded by the size after resizing, whatever its aspect ratio."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mammut.preprocess import ImagePreprocess


def _reference(im: Image.Image, size: int, interpolation: str) -> torch.Tensor:
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return TF.to_tensor(TF.center_crop(TF.resize(im, size, interpolation=mode), [size, size]))


def _smooth(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([128 + 100 * np.sin(yy / 17.0 + xx / 5), 128 + 100 * np.cos(yy / 9.0 + xx / 13),
                    (xx * 3 + yy * 0.7) % 255], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("w, h", [(640, 480), (480, 640), (300, 1199), (1199, 300), (64, 65)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_ordinary_shapes_are_open_clips_pixels_exactly(w, h, interpolation):
    im = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert torch.equal(ImagePreprocess(64, interpolation=interpolation)(im), _reference(im, 64, interpolation))


@pytest.mark.parametrize("w, h", [(1000, 37), (3000, 50), (2000, 31)])
def test_wide_extremes_match_the_full_resize_within_one_level(w, h):
    im = _smooth(w, h)
    for size in (32, 64):
        diff = (ImagePreprocess(size)(im) - _reference(im, size, "bicubic")).abs().max().item()
        assert diff <= 1 / 255 + 1e-6


def test_tall_extremes_stay_close_to_the_full_resize():
    im = _smooth(37, 1000)
    diff = (ImagePreprocess(64)(im) - _reference(im, 64, "bicubic")).abs()
    assert diff.mean().item() < 1 / 255 and (diff > 1.5 / 255).float().mean().item() < 0.05


@pytest.mark.parametrize("shape", [(1, 1_000_000), (1_000_000, 1)])
def test_a_one_pixel_wide_image_costs_megabytes_not_gigabytes(shape):
    # before: short side up to 32 first, i.e. 32 x 32,000,000 RGB pixels (3 GB) for a 2 KB PNG
    code = textwrap.dedent(f"""
        import io, resource
        from PIL import Image
        from mammut.preprocess import ImagePreprocess
        buf = io.BytesIO(); Image.new("RGB", {shape}, (10, 200, 30)).save(buf, "PNG")
        im = Image.open(io.BytesIO(buf.getvalue())); im.load()
        pre = ImagePreprocess(32)
        pre(Image.new("RGB", (40, 40)))  # imports done before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = pre(im)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(len(buf.getvalue()), tuple(x.shape), round(float(x[1].mean()), 3), grew // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    png_bytes, shape_out, green, grew_mb = out.stdout.split(" ", 1)[0], *out.stdout.rsplit(" ", 3)[1:]
    assert int(png_bytes) < 10_000
    assert out.stdout.split(" (")[1].startswith("3, 32, 32)")
    assert abs(float(green) - 200 / 255) < 0.01  # the colour survives
    assert int(grew_mb) < 200, out.stdout


def test_the_training_decoder_and_eval_transform_take_it_too():
    from mammut.data.datasets import decode_image, image_transform

    buf = io.BytesIO()
    Image.new("RGBA", (3, 200_000), (0, 0, 255, 128)).save(buf, "PNG")
    im = decode_image(buf.getvalue(), where="tall.png")
    assert image_transform(48, train=False)(im).shape == (3, 48, 48)
    assert image_transform(48, train=True)(im).shape == (3, 48, 48)


def test_the_search_servers_encoder_path_stays_small_on_a_one_pixel_wide_upload():
    """What `/api/caption` and `/api/search/image` do with an upload: decode it, then
    ``encoder.preprocess`` (the model's ImagePreprocess), then embed. Before: 6.5 GB resident."""
    code = textwrap.dedent("""
        import io, resource, torch
        from PIL import Image
        from mammut import MaMMUT, ImagePreprocess
        from mammut.apps.encoder import ModelEncoder
        from mammut.data.datasets import decode_image
        model = MaMMUT(dim=32, num_tokens=50, depth=1, heads=2, dim_head=16,
                       vit=dict(image_size=32, patch_size=8, dim=32, depth=1, heads=2, dim_head=16))
        enc = ModelEncoder(model, ImagePreprocess(32), lambda texts: torch.ones(len(texts), 4, dtype=torch.long),
                           None, name="tiny", precision="fp32")
        buf = io.BytesIO(); Image.new("RGB", (1, 1_000_000), (10, 200, 30)).save(buf, "PNG")
        enc.embed_images(enc.preprocess(Image.new("RGB", (40, 40)))[None])  # imports and first call done
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        vec = enc.embed_images(enc.preprocess(decode_image(buf.getvalue(), where="upload.png"))[None])
        print(len(buf.getvalue()), vec.shape[0], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    png_bytes, rows, grew_mb = (int(v) for v in out.stdout.split())
    assert png_bytes < 10_000 and rows == 1
    assert grew_mb < 200, out.stdout

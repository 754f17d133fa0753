"""ViT at another resolution: ``set_image_size`` (resample the positional grid once) and
``dynamic_image_size`` (resample it on every call to the input's patch grid)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mammut import ViT
from mammut.encoders.vit import resample_pos_grid


def vit(**kw):
    cfg = dict(image_size=32, patch_size=8, dim=32, depth=1, heads=2, dim_head=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return ViT(**cfg).eval()


def smooth_grid(g, d=32):
    """A grid varying slowly over the patches (a few cycles across the whole image)."""
    pos = (torch.arange(g) + 0.5) / g
    freq = torch.linspace(0.25, 0.75, d)[:, None, None]
    phase = torch.linspace(0.0, 6.0, d)[:, None, None]
    return (torch.sin(2 * math.pi * freq * pos[None, :, None] + phase) * torch.cos(2 * math.pi * freq * pos[None, None, :]))[None]


@pytest.mark.parametrize("class_token", [False, True])
def test_same_size_is_an_exact_no_op(class_token):
    m = vit(class_token=class_token)
    x = torch.randn(2, 3, 32, 32)
    before = m(x)
    param = m.pos_emb
    m.set_image_size(32)
    assert m.pos_emb is param
    assert torch.equal(m(x), before)
    assert m.config.image_size == 32 and m.grid == 4


def test_resized_model_takes_the_new_size_and_refuses_the_old():
    m = vit()
    m.set_image_size(64)
    assert m.grid == 8 and m.config.image_size == 64
    assert isinstance(m.pos_emb, torch.nn.Parameter) and m.pos_emb.shape == (1, 32, 8, 8)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 64, 32)
    with pytest.raises(ValueError, match=r"images: expected shape \(batch, 3, 64, 64\).*set_image_size.*dynamic_image_size"):
        m(torch.randn(2, 3, 32, 32))


def test_set_image_size_does_not_change_the_callers_config():
    m = vit()
    shared = m.config
    m.set_image_size(64)
    assert shared.image_size == 32 and m.config.image_size == 64


def test_resampled_grid_is_bicubic_and_antialiased_when_shrinking():
    m = vit()
    grid = m.pos_emb.detach().clone()
    m.set_image_size(64)
    up = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.equal(m.pos_emb.detach(), up)
    big = m.pos_emb.detach().clone()
    m.set_image_size(16)
    down = F.interpolate(big, size=(2, 2), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(m.pos_emb.detach(), down)
    # (antialiasing matters here: without it the shrunk grid is another one)
    assert not torch.allclose(down, F.interpolate(big, size=(2, 2), mode="bicubic", align_corners=False))


def test_round_trip_up_and_down_returns_a_slowly_varying_grid():
    # Bicubic resampling reproduces constants exactly (its weights sum to 1) and linear ramps
    # away from the border, so a grid varying slowly across the patches comes back within a
    # few percent (the clamped border dominates the error: about 2% here). A white-noise grid
    # would not (about 30%: its top frequencies are filtered out going down), hence 5%.
    m = vit(image_size=64)
    with torch.no_grad():
        m.pos_emb.copy_(smooth_grid(8))
    original = m.pos_emb.detach().clone()
    m.set_image_size(128)
    m.set_image_size(64)
    err = (m.pos_emb.detach() - original).norm() / original.norm()
    assert err < 0.05
    constant = torch.full((1, 4, 5, 5), 0.3)
    torch.testing.assert_close(resample_pos_grid(resample_pos_grid(constant, (9, 9)), (5, 5)), constant)


def test_class_token_and_its_position_are_unchanged():
    m = vit(class_token=True)
    cls, cls_pos = m.cls_token.detach().clone(), m.cls_pos_emb.detach().clone()
    m.set_image_size(64)
    assert torch.equal(m.cls_pos_emb.detach(), cls_pos) and torch.equal(m.cls_token.detach(), cls)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1 + 64, 32)


def test_dtype_device_and_requires_grad_are_kept():
    m = vit().to(torch.float64)
    m.pos_emb.requires_grad_(False)
    m.set_image_size(48)
    assert m.pos_emb.dtype == torch.float64 and m.pos_emb.device.type == "cpu" and not m.pos_emb.requires_grad
    assert dict(m.named_parameters(recurse=False))["pos_emb"] is m.pos_emb
    assert m.state_dict()["pos_emb"].shape == (1, 32, 6, 6)


@pytest.mark.parametrize("class_token", [False, True])
def test_dynamic_mode_equals_set_image_size_and_the_trained_size_is_untouched(class_token):
    m = vit(class_token=class_token, dynamic_image_size=True)
    strict = copy.deepcopy(m)
    strict.config.dynamic_image_size = False
    x32, x64 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    assert torch.equal(m(x32), strict(x32))
    strict.set_image_size(64)
    assert torch.equal(m(x64), strict(x64))
    assert m.grid == 4 and m.pos_emb.shape == (1, 32, 4, 4)  # nothing stored


@pytest.mark.parametrize("class_token", [False, True])
def test_dynamic_mode_takes_non_square_images(class_token):
    m = vit(class_token=class_token, dynamic_image_size=True)
    out = m(torch.randn(2, 3, 24, 56))
    assert out.shape == (2, int(class_token) + 3 * 7, 32)
    pe = m.positional_embedding(2, (3, 7))
    expected = F.interpolate(m.pos_emb, size=(3, 7), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(pe, expected.flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_gradients_reach_the_grid_through_the_interpolation():
    m = vit(dynamic_image_size=True)
    m(torch.randn(2, 3, 48, 40)).square().mean().backward()
    grad = m.pos_emb.grad
    assert grad is not None and grad.shape == (1, 32, 4, 4)
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_dynamic_mode_with_cropped_positions_and_patch_dropout():
    m = vit(dynamic_image_size=True, cropped_pos_emb=True, patch_dropout=0.5).train()
    x = torch.randn(3, 3, 48, 64)
    assert m(x).shape == (3, 24, 32)  # half of the 6 x 8 patches
    pe = m.positional_embedding(3, (6, 8))
    assert pe.shape == (3, 48, 32) and not torch.allclose(pe[0], pe[1])
    m.eval()
    assert m(x).shape == (3, 48, 32)
    # strict mode after set_image_size: cropped positions act on the resampled grid
    s = vit(cropped_pos_emb=True, patch_dropout=0.5)
    s.set_image_size(64)
    s.train()
    assert s(torch.randn(2, 3, 64, 64)).shape == (2, 32, 32)
    assert s.positional_embedding(2).shape == (2, 64, 32)


def test_full_crop_in_dynamic_mode_at_the_trained_size_reproduces_the_grid():
    m = vit(dynamic_image_size=True, cropped_pos_emb=True, cpe_scale=(1.0, 1.0), cpe_ratio=(1.0, 1.0), cpe_upsample=1.0).train()
    pe = m.positional_embedding(2, (4, 4))
    torch.testing.assert_close(pe[0], m.pos_emb.flatten(2).transpose(1, 2)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [0, -8, 12, 4, 32.0, True, "64"])
def test_set_image_size_rejects_bad_sizes(size):
    m = vit()
    with pytest.raises(ValueError, match=r"image_size: expected a positive multiple of patch_size=8"):
        m.set_image_size(size)
    assert m.grid == 4 and m.config.image_size == 32


@pytest.mark.parametrize("shape", [(2, 3, 36, 32), (2, 3, 32, 4), (2, 1, 32, 32), (3, 32, 32), (2, 3, 0, 32)])
def test_dynamic_mode_rejects_bad_images(shape):
    with pytest.raises(ValueError, match="images: expected"):
        vit(dynamic_image_size=True)(torch.randn(*shape))


def test_video_tubes_refuse_a_vit_resized_after_wrapping():
    from mammut import VideoTubeConfig, VideoTubeViT

    vit = ViT(image_size=32, patch_size=8, dim=64, depth=1, heads=2, dim_head=32)
    video = VideoTubeViT(vit, VideoTubeConfig(frames=4, frame_stride=2, tubes=(((2, 8, 8), (2, 8, 8), (0, 0, 0)),)))
    vit.set_image_size(48)
    with pytest.raises(ValueError, match="before wrapping"):
        video(torch.randn(1, 3, 4, 48, 48))

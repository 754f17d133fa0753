import pytest
import torch

from mammut import ViT, ViTConfig


def vit(**kw):
    cfg = dict(image_size=32, patch_size=8, dim=32, depth=1, heads=2, dim_head=16)
    cfg.update(kw)
    return ViT(**cfg)


def test_tokens_shape_and_eval_is_deterministic():
    m = vit(patch_dropout=0.5, cropped_pos_emb=True).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, m(x))


def test_patch_dropout_keeps_a_random_subset_in_training_only():
    m = vit(patch_dropout=0.75).train()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 4, 32)
    assert m.eval()(x).shape == (2, 16, 32)


def test_cropped_positional_embedding():
    m = vit(cropped_pos_emb=True)
    m.train()
    pe = m.positional_embedding(3)
    assert pe.shape == (3, 16, 32)
    assert not torch.allclose(pe[0], pe[1])  # a different crop per image
    m.eval()
    torch.testing.assert_close(m.positional_embedding(3)[0], m.pos_emb.flatten(2).transpose(1, 2)[0])


def test_full_crop_reproduces_the_grid():
    # a crop box covering the whole upsampled grid resized back gives (nearly) the original grid
    m = vit(cropped_pos_emb=True, cpe_scale=(1.0, 1.0), cpe_ratio=(1.0, 1.0), cpe_upsample=1.0).train()
    pe = m.positional_embedding(2)
    torch.testing.assert_close(pe[0], m.pos_emb.flatten(2).transpose(1, 2)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 32, 32), (3, 32, 32)])
def test_bad_images(shape):
    with pytest.raises(ValueError, match="images"):
        vit()(torch.randn(*shape))


def test_bad_config():
    with pytest.raises(ValueError, match="image_size"):
        ViT(ViTConfig(image_size=30, patch_size=8))
    with pytest.raises(ValueError, match="patch_dropout"):
        vit(patch_dropout=1.0)

"""External vision encoders as ``img_encoder=`` (timm, Hugging Face, vit-pytorch): MaMMUT
forward and backward end to end, adapters, specs, checkpoints, and the seed README usage."""

from __future__ import annotations

import subprocess
import sys
from typing import Callable

import pytest
import torch
from torch import nn

from mammut import MaMMUT
from mammut.encoders.external import (
    EncoderAdapter,
    HFVisionEncoder,
    TimmEncoder,
    VitPytorchEncoder,
    build_encoder,
    encoder_spec,
    wrap_encoder,
)

IMG = 32
NUM_TOKENS = 64


def decoder_kwargs(**overrides) -> dict:
    kw = dict(dim=32, num_tokens=NUM_TOKENS, depth=2, dim_head=16, heads=2)
    kw.update(overrides)
    return kw


# ------------------------------------------------------------------------------ builders
def timm_vit() -> nn.Module:
    pytest.importorskip("timm")
    return TimmEncoder.create("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, embed_dim=24, num_heads=2, num_classes=0)


def timm_vit_raw_wrapped() -> nn.Module:
    timm = pytest.importorskip("timm")
    raw = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=1, embed_dim=24, num_heads=2)
    return wrap_encoder(raw, patch_tokens_only=True)


def timm_cnn() -> nn.Module:
    pytest.importorskip("timm")
    return TimmEncoder.create("test_efficientnet", num_classes=0)


def timm_nhwc() -> nn.Module:
    pytest.importorskip("timm")
    return TimmEncoder.create("test_mambaout", num_classes=0)


def hf_clip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=8
    )
    return wrap_encoder(transformers.CLIPVisionModel(cfg), hidden_layer=-2, patch_tokens_only=True)


def hf_siglip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMG, patch_size=8
    )
    return HFVisionEncoder(transformers.SiglipVisionModel(cfg))


def vitpytorch_extractor() -> nn.Module:
    pytest.importorskip("vit_pytorch")
    from vit_pytorch.extractor import Extractor
    from vit_pytorch.simple_vit_with_patch_dropout import SimpleViT

    vit = SimpleViT(image_size=IMG, patch_size=8, num_classes=10, dim=48, depth=1, heads=2, mlp_dim=64, dim_head=16, patch_dropout=0.5)
    return Extractor(vit, return_embeddings_only=True, detach=False)


def vitpytorch_bare_vit() -> nn.Module:
    pytest.importorskip("vit_pytorch")
    from vit_pytorch import ViT as LucidViT

    return wrap_encoder(LucidViT(image_size=IMG, patch_size=8, num_classes=10, dim=40, depth=1, heads=2, mlp_dim=64, dim_head=16))


# name -> (builder, expected tokens, width, rebuilt from spec on load)
ENCODERS: dict[str, tuple[Callable[[], nn.Module], int, int, bool]] = {
    "timm_vit": (timm_vit, 17, 24, True),
    "timm_vit_raw_wrapped": (timm_vit_raw_wrapped, 16, 24, False),
    "timm_cnn": (timm_cnn, 1, 256, True),
    "timm_nhwc": (timm_nhwc, 1, 64, True),
    "hf_clip": (hf_clip, 16, 32, True),
    "hf_siglip": (hf_siglip, 16, 32, True),
    "vitpytorch_extractor": (vitpytorch_extractor, 16, 48, False),
    "vitpytorch_bare_vit": (vitpytorch_bare_vit, 17, 40, False),
}


def _build(name: str) -> tuple[nn.Module, int, int, bool]:
    builder, n, d, has_spec = ENCODERS[name]
    return builder(), n, d, has_spec


# ------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_in_mammut_forward_backward(name):
    encoder, n, d, _ = _build(name)
    images = torch.randn(2, 3, IMG, IMG)
    encoder.eval()  # (the vit-pytorch SimpleViT drops half its patches in training)
    with torch.no_grad():
        assert encoder(images).shape == (2, n, d)
    image_dim = None if hasattr(encoder, "dim") else d
    if hasattr(encoder, "dim"):
        assert encoder.dim == d
    model = MaMMUT(**decoder_kwargs(image_dim=image_dim), img_encoder=encoder)
    text = torch.randint(1, NUM_TOKENS, (2, 6))

    model.train()
    loss = model(text, images, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    enc_grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert enc_grads and any(g.abs().sum() > 0 for g in enc_grads), "no gradient reached the image encoder"
    assert model.token_emb.weight.grad is not None

    model.eval()
    with torch.no_grad():
        logits = model(text, images)
        text_emb, image_emb = model(text, images, return_embeddings=True)
    assert logits.shape == (2, 6, NUM_TOKENS)
    assert text_emb.shape == image_emb.shape == (2, 32)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_checkpoint_round_trip(name, tmp_path):
    pytest.importorskip("safetensors")
    encoder, _, d, has_spec = _build(name)
    model = MaMMUT(**decoder_kwargs(image_dim=None if hasattr(encoder, "dim") else d), img_encoder=encoder).eval()
    path = model.save_pretrained(tmp_path)
    if has_spec:
        loaded = MaMMUT.from_pretrained(path)
    else:
        with pytest.raises(TypeError, match="pass img_encoder="):
            MaMMUT.from_pretrained(path)
        loaded = MaMMUT.from_pretrained(path, img_encoder=_build(name)[0])
    text = torch.randint(1, NUM_TOKENS, (2, 6))
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model(text, images), loaded(text, images))
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------- seed README usage
@pytest.mark.parametrize("layout", [dict(), dict(cross_attend_every=2), dict(cross_attend_layers=(2,))])
def test_seed_readme_usage(layout):
    """The seed README's example, shrunk: an Extractor-wrapped SimpleViT with patch dropout."""
    pytest.importorskip("vit_pytorch")
    from vit_pytorch.extractor import Extractor
    from vit_pytorch.simple_vit_with_patch_dropout import SimpleViT

    vit = SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2, mlp_dim=64, patch_dropout=0.5)
    vit = Extractor(vit, return_embeddings_only=True, detach=False)
    mammut = MaMMUT(
        dim=32, img_encoder=vit, image_dim=64, num_tokens=100, depth=2, dim_head=16, heads=2,
        caption_loss_weight=1.0, contrastive_loss_weight=1.0, **layout,
    )
    text = torch.randint(0, 100, (4, 12))
    text[:, 0] = 1  # no all-padding rows
    images = torch.randn(4, 3, 32, 32)
    loss = mammut(text=text, images=images, return_loss=True)
    loss.backward()
    assert vit.vit.to_patch_embedding[2].weight.grad is not None
    logits = mammut(text=text, images=images)
    assert logits.shape == (4, 12, 100)
    text_embeds, image_embeds = mammut(text=text, images=images, return_embeddings=True)
    assert text_embeds.shape == image_embeds.shape == (4, 32)


# ------------------------------------------------------------------------ adapters, specs
def test_check_images_errors_name_the_argument():
    encoder = timm_vit()
    with pytest.raises(ValueError, match=r"images: timm VisionTransformer expects height x width 32 x 32"):
        encoder(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="images: .*expects 3 channels"):
        encoder(torch.randn(1, 1, IMG, IMG))
    with pytest.raises(TypeError, match="images: expected a float tensor"):
        encoder(torch.zeros(1, 3, IMG, IMG, dtype=torch.long))
    clip = hf_clip()
    with pytest.raises(ValueError, match="images: CLIPVisionModel expects height x width 32 x 32"):
        clip(torch.randn(1, 3, 48, 48))
    model = MaMMUT(**decoder_kwargs(), img_encoder=clip)
    with pytest.raises(ValueError, match="images:"):
        model(torch.randint(1, NUM_TOKENS, (1, 4)), torch.randn(1, 3, 16, 16))


def test_wrap_encoder_dispatch_and_passthrough():
    from mammut.encoders import ViT

    ours = ViT(image_size=16, patch_size=8, dim=32, depth=1, heads=2, dim_head=16)
    assert wrap_encoder(ours) is ours
    adapter = timm_vit()
    assert wrap_encoder(adapter) is adapter
    plain = nn.Identity()
    assert wrap_encoder(plain) is plain
    with pytest.raises(TypeError, match="no adapter for Identity"):
        wrap_encoder(plain, dim=3)
    with pytest.raises(TypeError, match="module: expected an nn.Module"):
        wrap_encoder("timm:vit")
    assert isinstance(wrap_encoder(vitpytorch_extractor()), VitPytorchEncoder)
    assert isinstance(hf_clip(), HFVisionEncoder)
    for adapter in (timm_vit(), hf_siglip()):
        assert isinstance(adapter, EncoderAdapter)


def test_specs_rebuild_the_same_architecture():
    from mammut.encoders import ViT

    for encoder in (timm_vit(), hf_clip(), ViT(image_size=16, patch_size=8, dim=32, depth=1, heads=2, dim_head=16)):
        spec = encoder_spec(encoder)
        rebuilt = build_encoder(spec)
        assert type(rebuilt) is type(encoder)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}
        assert encoder_spec(rebuilt) == spec
    assert encoder_spec(vitpytorch_extractor()) is None
    assert encoder_spec(nn.Identity()) is None
    by_string = build_encoder("timm:vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=1, embed_dim=24, num_heads=2, num_classes=0)
    assert isinstance(by_string, TimmEncoder) and by_string.dim == 24


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("timm", ValueError, "spec: expected 'timm:<model name>'"),
        ({"name": "x"}, TypeError, "'type' key"),
        ({"type": "keras"}, ValueError, r"spec\['type'\]"),
        ({"type": "transformers", "class": "os", "config": {}}, ValueError, r"spec\['class'\]"),
        ({"type": "transformers", "class": "AutoTokenizer", "config": {}}, ValueError, r"spec\['class'\]"),
    ],
)
def test_bad_specs(spec, error, match):
    pytest.importorskip("transformers")
    with pytest.raises(error, match=match):
        build_encoder(spec)


def test_timm_create_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="pretrained"):
        TimmEncoder.create("vit_tiny_patch16_224", pretrained=True)


def test_import_mammut_does_not_import_extras():
    code = (
        "import sys, mammut, mammut.encoders.external\n"
        "bad = [m for m in ('timm', 'transformers', 'vit_pytorch', 'safetensors', 'huggingface_hub', 'open_clip') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

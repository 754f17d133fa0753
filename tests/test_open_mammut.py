"""openMaMMUT (LAION's open_clip fork) -> mammut MaMMUT: the conversion against a reference
written here from the fork's semantics (``../shared/reference.md``, section openMaMMUT), in the
fork's state-dict layout, on tiny configs. The fork is not on PyPI; the same checks were run once
by hand against the fork's own ``MaMMUT`` class (image/text embeddings and logits equal to 2e-7,
B/32 included) — the closing note of the openMaMMUT issue says how.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mammut import MaMMUT
from mammut.convert.open_mammut import (
    OPEN_MAMMUT_CONFIGS,
    OPEN_MAMMUT_MODELS,
    fork_cross_attention_layers,
    mammut_config_from_open_clip,
    mammut_from_open_clip,
)


# ----------------------------------------------------------------------------- the reference
class RefBlock(nn.Module):
    """Pre-norm residual block of the fork: ``x + attn(ln_1 x [, ln_1_kv ctx])``, then
    ``+ mlp(ln_2 x)`` when it has an MLP."""

    def __init__(self, width: int, heads: int, *, cross: bool = False, mlp: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        if cross:
            self.ln_1_kv = nn.LayerNorm(width)
        if mlp:
            self.ln_2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)))
        self.has_mlp = mlp

    def forward(self, x, context=None, mask=None):
        q = self.ln_1(x)
        kv = self.ln_1_kv(context) if context is not None else q
        x = x + self.attn(q, kv, kv, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x)) if self.has_mlp else x


class RefVisual(nn.Module):
    def __init__(self, size: int, patch: int, width: int, layers: int, embed: int) -> None:
        super().__init__()
        grid = size // patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(RefBlock(width, width // 64) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed))

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.class_embedding.expand(x.shape[0], 1, -1), x), dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x.mean(dim=1)) @ self.proj, x  # (pooled over ALL tokens, raw tokens)


class RefText(nn.Module):
    def __init__(self, ctx: int, vocab: int, width: int, heads: int, layers: int, ratio: int, has_mlp: bool) -> None:
        super().__init__()
        step = layers // (layers // ratio)
        self.step = step
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width))
        self.resblocks = nn.ModuleList(RefBlock(width, heads, mlp=has_mlp or i % step != 0) for i in range(layers))
        self.cross_attn = nn.ModuleList(RefBlock(width, heads, cross=True) for i in range(layers) if i % step == 0)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, vocab))

    def forward(self, text, context=None):
        n = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:n]
        # without the image: no mask at all (pads attended); with it: causal, no padding mask
        mask = None if context is None else torch.full((n, n), float("-inf")).triu(1)
        for i, block in enumerate(self.resblocks):
            x = block(x, mask=mask)
            if context is not None and i % self.step == 0:
                x = self.cross_attn[i // self.step](x, context)
        x = self.ln_final(x)
        return x @ self.text_projection, x


class RefOpenMaMMUT(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        self.visual = RefVisual(v["image_size"], v["patch_size"], v["width"], v["layers"], cfg["embed_dim"])
        self.text = RefText(t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"],
                            t["cross_attn_ratio"], t.get("has_mlp", True))
        self.map_viz2txt_kv = nn.Parameter(torch.randn(v["width"], t["width"]))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def embed_image(self, images):
        return F.normalize(self.visual(images)[0], dim=-1)

    def embed_text(self, text):
        return F.normalize(self.text(text)[1].mean(dim=1), dim=-1)

    def logits(self, text, images):
        return self.text(text, self.visual(images)[1] @ self.map_viz2txt_kv)[0]


def tiny_config(*, has_mlp: bool = False, layers: int = 4, ratio: int = 2, size: int = 32) -> dict:
    return dict(
        embed_dim=64,
        vision_cfg=dict(image_size=size, layers=2, width=128, patch_size=8, output_tokens=True, pool_type="avg_all",
                        final_ln_after_pool=True),
        text_cfg=dict(context_length=12, vocab_size=300, width=64, heads=2, layers=layers, output_tokens=True,
                      cross_attn_ratio=ratio, does_full_decoding=True, has_mlp=has_mlp),
    )


def reference(cfg: dict, seed: int = 0) -> RefOpenMaMMUT:
    torch.manual_seed(seed)
    ref = RefOpenMaMMUT(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    return ref


def texts(ctx: int, lengths=(3, 7, 12), vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    out = torch.zeros(len(lengths), ctx, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    return out


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("has_mlp,layers,ratio", [(False, 4, 2), (True, 4, 2), (True, 6, 3), (False, 6, 2)])
def test_converted_model_equals_the_reference(has_mlp, layers, ratio):
    cfg = tiny_config(has_mlp=has_mlp, layers=layers, ratio=ratio)
    ref = reference(cfg)
    model = mammut_from_open_clip(cfg, ref.state_dict())
    images = torch.randn(3, 3, 32, 32)
    text = texts(12)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_image(images), ref.embed_image(images), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(model.embed_text(text), ref.embed_text(text), atol=2e-6, rtol=1e-5)
        keep = text != 0  # our captioning pass masks pads as keys; real tokens see the same
        torch.testing.assert_close(model(text, images)[keep], ref.logits(text, images)[keep], atol=2e-6, rtol=1e-5)
    assert model.config.cross_attention_layers() == fork_cross_attention_layers(layers, ratio)
    assert not model.training


def test_text_embedding_follows_the_forks_pad_rule():
    """Pads are attended to and averaged (text_pool="mean_all"): the same words padded to
    another length embed differently, as in the fork (its tokenizer always pads to 77)."""
    cfg = tiny_config()
    model = mammut_from_open_clip(cfg, reference(cfg).state_dict())
    text = texts(12, lengths=(4,))
    with torch.no_grad():
        full, short = model.embed_text(text), model.embed_text(text[:, :6])
    assert not torch.allclose(full, short, atol=1e-3)


def test_cross_attention_layers_follow_the_forks_rule():
    assert fork_cross_attention_layers(12, 2) == (1, 3, 5, 7, 9, 11)
    assert fork_cross_attention_layers(24, 2) == tuple(range(1, 24, 2))
    assert fork_cross_attention_layers(6, 3) == (1, 4)
    assert fork_cross_attention_layers(6, 4) == (1,)  # one block: every 6th layer from the first
    with pytest.raises(ValueError, match="cross_attn_ratio"):
        fork_cross_attention_layers(4, 5)
    with pytest.raises(ValueError, match="gives 3 cross-attention blocks"):  # the fork asserts on it too
        fork_cross_attention_layers(5, 2)


@pytest.mark.parametrize("name", OPEN_MAMMUT_MODELS)
def test_every_fork_config_converts_with_every_tensor_mapped(name):
    """On the meta device: the reference in the fork's layout converts tensor for tensor and
    the two hold the same number of parameters."""
    cfg = OPEN_MAMMUT_CONFIGS[name]
    if cfg["vision_cfg"].get("head_width", 64) != 64:
        cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "head_width": 64}}  # the reference's heads are 64 wide
    with torch.device("meta"):
        ref = RefOpenMaMMUT(cfg)
    sd = ref.state_dict()
    if name == "mammut_ViT-L-14":
        assert len(sd) == 531  # the published L/14 file's tensor count (reference.md)
    model = mammut_from_open_clip(cfg, sd)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert model.config.max_text_len == 77 and model.config.num_tokens == 49408


def test_caption_loss_and_greedy_decoding_run_on_the_converted_model():
    cfg = tiny_config()
    model = mammut_from_open_clip(cfg, reference(cfg).state_dict())
    images, text = torch.randn(2, 3, 32, 32), texts(12, lengths=(5, 9))
    model.train()
    loss = model(text, images, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and model.img_proj.weight.grad is not None
    model.eval()
    prompt = torch.ones(2, 1, dtype=torch.long)  # a 300-token test vocabulary has no CLIP start/end ids
    cached = model.generate(images, prompt, max_new_tokens=6, eos_id=2)
    uncached = model.generate(images, prompt, max_new_tokens=6, eos_id=2, use_cache=False)
    assert torch.equal(cached, uncached)


def test_decoding_past_the_learned_positions_is_a_clear_error():
    cfg = tiny_config()
    model = mammut_from_open_clip(cfg, reference(cfg).state_dict())
    with pytest.raises(ValueError, match="max_text_len"):
        model.embed_text(torch.ones(1, 13, dtype=torch.long))


def test_weights_at_another_resolution_take_their_grid():
    """The 512 px fine-tune's case: the positional grid of the weights sets the image size."""
    cfg = tiny_config(size=48)
    ref = reference(cfg)
    model = mammut_from_open_clip(tiny_config(size=32), ref.state_dict())
    assert model.img_encoder.config.image_size == 48
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_image(images), ref.embed_image(images), atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_bad_weights_are_named_and_nothing_is_half_loaded():
    cfg = tiny_config()
    sd = reference(cfg).state_dict()
    missing = {k: v for k, v in sd.items() if k != "text.cross_attn.1.ln_2.weight"}
    with pytest.raises(ValueError, match=r"missing openMaMMUT key 'text.cross_attn.1.ln_2.weight'"):
        mammut_from_open_clip(cfg, missing)
    with pytest.raises(ValueError, match=r"no place in this config, e.g. \['extra.weight'\]"):
        mammut_from_open_clip(cfg, {**sd, "extra.weight": torch.zeros(1)})
    wrong = {**sd, "text.token_embedding.weight": torch.zeros(301, 64)}
    with pytest.raises(ValueError, match=r"token_emb.weight: expected \(300, 64\), got \(301, 64\)"):
        mammut_from_open_clip(cfg, wrong)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="model_name: expected one of mammut_ViT-B-14"):
        mammut_from_open_clip("mammut_ViT-X-99", {})
    with pytest.raises(ValueError, match="CoCa"):
        mammut_config_from_open_clip({**tiny_config(), "multimodal_cfg": {}})
    with pytest.raises(ValueError, match="embed_dim == text_cfg.width"):
        mammut_config_from_open_clip({**tiny_config(), "embed_dim": 32})
    bad = tiny_config()
    bad["vision_cfg"]["pool_type"] = "tok"
    with pytest.raises(ValueError, match="vision_cfg.pool_type"):
        mammut_config_from_open_clip(bad)


def test_from_open_clip_and_a_checkpoint_file(tmp_path):
    cfg = tiny_config()
    ref = reference(cfg)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    model = MaMMUT.from_open_clip(cfg, str(path))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_image(images), ref.embed_image(images), atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- the options as a model
def test_openmammut_options_round_trip_through_our_checkpoint_format(tmp_path):
    cfg = tiny_config(has_mlp=False, layers=4)
    model = mammut_from_open_clip(cfg, reference(cfg).state_dict())
    model.save_pretrained(tmp_path / "ckpt")
    again = MaMMUT.from_pretrained(tmp_path / "ckpt").eval()
    assert again.config == model.config
    images, text = torch.randn(2, 3, 32, 32), texts(12, lengths=(4, 12))
    with torch.no_grad():
        assert torch.equal(again(text, images), model(text, images))
        assert torch.equal(again.embed_text(text), model.embed_text(text))


def test_focal_directions_is_a_model_option():
    """contrastive_directions="sum" (RO-ViT's formula) is exactly twice the default's
    contrastive part; the softmax loss refuses "sum"."""
    from mammut import MaMMUTConfig
    from mammut.models import get_model_spec

    tiny = get_model_spec("mammut").tiny
    images, text = torch.randn(3, 3, 32, 32), texts(10, lengths=(3, 5, 10))
    parts = []
    for directions in ("mean", "sum"):
        torch.manual_seed(0)
        model = MaMMUT(MaMMUTConfig(**tiny, contrastive_directions=directions)).eval()
        parts.append(model.compute_losses(text, images).contrastive)
    torch.testing.assert_close(parts[1], 2 * parts[0])
    with pytest.raises(ValueError, match="directions"):
        MaMMUT(MaMMUTConfig(**{**tiny, "contrastive_loss": "softmax", "contrastive_directions": "sum"}))

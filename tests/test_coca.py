import pytest
import torch
import torch.nn.functional as F

from mammut.layers import KVCache
from mammut.losses import caption_loss
from mammut.models import create_model
from mammut.models.coca import CoCa, CoCaConfig
from mammut.models.mammut import LossOutput

VOCAB = 50
VIT = dict(image_size=32, patch_size=8, dim=48, depth=1, heads=2, dim_head=24)
# open_clip's CoCa layout (the options from_open_clip sets), at toy size
OPEN_CLIP_STYLE = dict(
    image_pool="shared", pool_norm_queries=True, block="sequential", activation="gelu", positions="learned",
    max_text_len=16, cls_position="end", cls_mask="open_clip_legacy", context_norm=True, bias=True, tie_embeddings=False,
    vit=dict(VIT, class_token=True, pre_norm=True, final_norm=False, bias=True, patch_bias=False),
)
VARIANTS = [
    {},
    dict(image_pool="shared"),
    dict(kv_heads=1, activation="quickgelu"),
    dict(block="sequential", activation="gelu", positions="learned", max_text_len=16, bias=True, context_norm=True),
    OPEN_CLIP_STYLE,
]
INVARIANT = VARIANTS[:4]  # CLS after the real tokens: padding-invariant by design


def tiny(**kw):
    cfg = dict(dim=32, num_tokens=VOCAB, unimodal_depth=2, multimodal_depth=2, heads=2, dim_head=16, num_img_queries=6, vit=VIT)
    cfg.update(kw)
    return CoCa(**cfg).eval()


def batch(b=3, n=8):
    return torch.randint(1, VOCAB, (b, n)), torch.randn(b, 3, 32, 32)


def test_seed_readme_snippet_runs_with_only_the_import_changed():
    from vit_pytorch.extractor import Extractor
    from vit_pytorch.simple_vit_with_patch_dropout import SimpleViT

    vit = SimpleViT(image_size=64, patch_size=16, num_classes=10, dim=64, depth=1, heads=2, mlp_dim=64, patch_dropout=0.5)
    vit = Extractor(vit, return_embeddings_only=True, detach=False)

    from mammut.models.coca import CoCa  # was: from coca_pytorch.coca_pytorch import CoCa

    coca = CoCa(
        dim=32, img_encoder=vit, image_dim=64, num_tokens=200, unimodal_depth=2, multimodal_depth=2, dim_head=16, heads=2,
        caption_loss_weight=1.0, contrastive_loss_weight=1.0,
    )
    text = torch.randint(0, 200, (4, 24))
    images = torch.randn(4, 3, 64, 64)
    loss = coca(text=text, images=images, return_loss=True)
    loss.backward()
    logits = coca(text=text, images=images)
    assert logits.shape == (4, 24, 200)
    text_embeds, image_embeds = coca(text=text, images=images, return_embeddings=True)
    assert text_embeds.shape == image_embeds.shape == (4, 32)


def test_seed_defaults_and_registry():
    cfg = CoCaConfig()
    assert (cfg.caption_loss_weight, cfg.contrastive_loss_weight) == (1.0, 1.0)
    assert cfg.image_pool == "separate" and cfg.block == "parallel" and cfg.tie_embeddings
    assert isinstance(create_model("coca", dim=16, num_tokens=20, unimodal_depth=1, multimodal_depth=1, heads=2, dim_head=8), CoCa)


@pytest.mark.parametrize("options", VARIANTS)
def test_shapes_and_normalised_embeddings(options):
    model = tiny(**options)
    text, images = batch()
    assert model(text, images).shape == (3, 8, VOCAB)
    t, i = model(text, images, return_embeddings=True)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(t, model.embed_text(text))
    torch.testing.assert_close(i, model.embed_image(images))
    assert model.image_context(images).shape == (3, 6, 32)
    parts = model.compute_losses(text, images)
    assert isinstance(parts, LossOutput) and all(torch.isfinite(p) for p in parts)


def test_image_poolers():
    sep, shared = tiny(), tiny(image_pool="shared")
    assert sep.img_pool.queries.shape[0] == 6 and sep.img_pool_contrastive.queries.shape[0] == 1
    assert shared.img_pool.queries.shape[0] == 7 and shared.img_pool_contrastive is None
    # shared: query 0 is the contrastive embedding, queries 1.. the decoder context
    _, images = batch()
    tokens = shared.img_encoder(images)
    pooled = shared.img_pool(tokens)
    torch.testing.assert_close(shared.image_context(images), pooled[:, 1:])
    torch.testing.assert_close(shared.embed_image(images), F.normalize(shared.img_to_latents(pooled[:, 0]), dim=-1))


def test_precomputed_image_tokens_match_images():
    model = tiny()
    text, images = batch()
    tokens = model.img_encoder(images)
    torch.testing.assert_close(model(text, image_tokens=tokens), model(text, images))


@pytest.mark.parametrize("options", VARIANTS)
def test_cls_sees_every_real_token_and_no_pad(options):
    model = tiny(**options)
    text, _ = batch(n=9)
    text[:, 6:] = 0
    base = model.embed_text(text)
    # the last real token reaches the CLS
    changed = text.clone()
    changed[:, 5] = changed[:, 5] % (VOCAB - 1) + 1
    assert not torch.allclose(model.embed_text(changed), base)
    # what the pad token embeds never reaches it (open_clip's legacy mask does see the first pad)
    with torch.no_grad():  # a random direction: a constant shift would vanish in the LayerNorms
        model.token_emb.weight[0] += torch.randn(model.token_emb.weight.shape[1], generator=torch.Generator().manual_seed(0))
    moved = model.embed_text(text)
    if options.get("cls_mask") == "open_clip_legacy":
        assert not torch.allclose(moved, base)
    else:
        torch.testing.assert_close(moved, base)


@pytest.mark.parametrize("options", INVARIANT)
def test_right_padding_changes_neither_embedding_nor_loss(options):
    model = tiny(**options)
    text, images = batch(n=7)
    text[:, -1] = 0
    text[0, 4:] = 0
    padded = F.pad(text, (0, 5), value=0)
    torch.testing.assert_close(model.embed_text(text), model.embed_text(padded), atol=1e-5, rtol=1e-5)
    for a, b in zip(model.compute_losses(text, images), model.compute_losses(padded, images)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(padded, images)[:, :7], model(text, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", VARIANTS)
def test_caption_logits_are_causal(options):
    model = tiny(**options)
    text, images = batch(n=10)
    logits = model(text, images)
    text2 = text.clone()
    text2[:, 6] = text2[:, 6] % (VOCAB - 1) + 1
    logits2 = model(text2, images)
    torch.testing.assert_close(logits[:, :6], logits2[:, :6])
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])


@pytest.mark.parametrize("options", VARIANTS)
def test_decoder_protocol_and_kv_cache_match_the_full_pass(options):
    model = tiny(**options)
    text, images = batch(n=7)
    context = model.image_context(images)
    full = model(text, images)
    torch.testing.assert_close(model.decode(text, context), full, atol=1e-5, rtol=1e-5)
    cache, steps = KVCache(), []
    keep = text != 0
    for i in range(text.shape[1]):
        steps.append(model.decode(text[:, i : i + 1], context, keep=keep[:, : i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_prompt_decodes_like_the_unpadded_one():
    model = tiny()
    text, images = batch(b=2, n=5)
    context = model.image_context(images)
    ref = model.decode(text[:1, 2:], context[:1])
    left = text[:1].clone()
    left[:, :2] = 0
    torch.testing.assert_close(model.decode(left, context[:1])[:, 2:], ref, atol=1e-5, rtol=1e-5)


def test_loss_parts_match_direct_computation():
    model = tiny(caption_loss_weight=2.0, contrastive_loss_weight=0.5)
    text, images = batch(n=9)
    text[1, 6:] = 0
    parts = model.compute_losses(text, images)
    cap = caption_loss(model(text[:, :-1], images), text[:, 1:], pad_id=0)
    t, i = model(text, images, return_embeddings=True)
    sim = model.contrastive.logit_scale() * t @ i.t()
    labels = torch.arange(3)
    con = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels))
    torch.testing.assert_close(parts.caption, cap)
    torch.testing.assert_close(parts.contrastive, con)
    torch.testing.assert_close(parts.total, 2.0 * cap + 0.5 * con)
    torch.testing.assert_close(model(text, images, return_loss=True), parts.total)
    # explicit labels: the decoder reads all of text
    labels_ = torch.roll(text, -1, dims=1)
    cap2 = model.compute_losses(text, images, labels=labels_).caption
    torch.testing.assert_close(cap2, caption_loss(model(text, images), labels_, pad_id=0))
    torch.testing.assert_close(model.contrastive.logit_scale(), torch.tensor(1 / 0.07))


@pytest.mark.parametrize("options", [{}, OPEN_CLIP_STYLE])
def test_tiny_model_overfits_a_fixed_batch(options):
    torch.manual_seed(0)
    model = tiny(**options).train()
    text, images = batch(b=4, n=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(text, images, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first


def test_checkpoint_round_trip(tmp_path):
    pytest.importorskip("mammut.io.checkpoint")
    model = tiny(**OPEN_CLIP_STYLE)
    text, images = batch()
    model.save_pretrained(tmp_path)
    loaded = CoCa.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(text, images), model(text, images))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randint(1, VOCAB, (2, 5)), torch.randn(2, 3, 16, 16)), "images"),
        (lambda m: m(torch.full((2, 5), VOCAB), torch.randn(2, 3, 32, 32)), "num_tokens"),
        (lambda m: m(torch.randint(1, VOCAB, (3, 5)), torch.randn(2, 3, 32, 32)), "batch"),
        (lambda m: m(torch.zeros(2, 5, dtype=torch.long), torch.randn(2, 3, 32, 32)), "empty"),
        (lambda m: m(torch.randn(2, 5), torch.randn(2, 3, 32, 32)), "text"),
        (lambda m: m(torch.randint(1, VOCAB, (5,)), torch.randn(1, 3, 32, 32)), "text"),
        (lambda m: m(torch.randint(1, VOCAB, (2, 5))), "images / image_tokens"),
        (lambda m: m(torch.randint(1, VOCAB, (2, 5)), image_tokens=torch.randn(2, 4, 7)), "image_dim"),
        (lambda m: m(torch.randint(1, VOCAB, (2, 1)), torch.randn(2, 3, 32, 32), return_loss=True), "text"),
        (lambda m: m(torch.randint(1, VOCAB, (2, 5)), torch.randn(2, 3, 32, 32), labels=torch.ones(2, 4, dtype=torch.long), return_loss=True), "labels"),
    ],
)
def test_bad_input_gives_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(tiny())


def test_learned_positions_reject_text_that_is_too_long():
    model = tiny(positions="learned", max_text_len=8)
    text, images = batch(n=8)
    model(text, images)
    with pytest.raises(ValueError, match="max_text_len"):
        model(torch.randint(1, VOCAB, (3, 9)), images)


def test_bad_config_gives_clear_errors():
    for bad, match in [
        (dict(image_pool="mean"), "image_pool"),
        (dict(block="ffn"), "block"),
        (dict(positions="alibi"), "positions"),
        (dict(cls_mask="none"), "cls_mask"),
        (dict(activation="relu"), "activation"),
        (dict(pad_id=99, num_tokens=10), "pad_id"),
        (dict(heads=0), "heads"),
    ]:
        with pytest.raises(ValueError, match=match):
            CoCaConfig(**bad)
    with pytest.raises(ValueError, match="kv_heads"):
        tiny(kv_heads=3)
    with pytest.raises(TypeError):
        CoCa(CoCaConfig(), dim=8)

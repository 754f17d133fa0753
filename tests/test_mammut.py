import pytest
import torch
import torch.nn.functional as F

from mammut import MaMMUT, MaMMUTConfig
from mammut.losses import caption_loss, focal_contrastive_loss

VIT = dict(image_size=32, patch_size=8, dim=48, depth=1, heads=2, dim_head=24)
SEED_OPTIONS = dict(contrastive_pass="causal", text_pool="cls", image_pool="attention", contrastive_loss="softmax", num_img_queries=6)


def tiny(**kw):
    cfg = dict(dim=32, num_tokens=50, depth=4, heads=2, dim_head=16, vit=VIT)
    cfg.update(kw)
    return MaMMUT(**cfg).eval()


def batch(b=3, n=8, vocab=50):
    return torch.randint(1, vocab, (b, n)), torch.randn(b, 3, 32, 32)


def test_seed_readme_snippet_runs_with_only_the_import_changed():
    from vit_pytorch.extractor import Extractor
    from vit_pytorch.simple_vit_with_patch_dropout import SimpleViT

    vit = SimpleViT(image_size=64, patch_size=16, num_classes=10, dim=64, depth=1, heads=2, mlp_dim=64, patch_dropout=0.5)
    vit = Extractor(vit, return_embeddings_only=True, detach=False)
    mammut = MaMMUT(
        dim=32, img_encoder=vit, image_dim=64, num_tokens=200, depth=3, dim_head=16, heads=2,
        caption_loss_weight=1.0, contrastive_loss_weight=1.0,
    )
    text = torch.randint(0, 200, (4, 24))
    images = torch.randn(4, 3, 64, 64)
    loss = mammut(text=text, images=images, return_loss=True)
    loss.backward()
    logits = mammut(text=text, images=images)
    assert logits.shape == (4, 24, 200)
    text_embeds, image_embeds = mammut(text=text, images=images, return_embeddings=True)
    assert text_embeds.shape == image_embeds.shape == (4, 32)
    for kw in (dict(cross_attend_every=2), dict(cross_attend_layers=(2, 3))):
        m = MaMMUT(dim=32, img_encoder=vit, image_dim=64, num_tokens=200, depth=3, dim_head=16, heads=2,
                   caption_loss_weight=1.0, contrastive_loss_weight=1.0, **kw)
        assert m(text=text, images=images).shape == (4, 24, 200)


@pytest.mark.parametrize("options", [{}, SEED_OPTIONS, dict(kv_heads=1)])
def test_shapes_and_normalised_embeddings(options):
    model = tiny(**options)
    text, images = batch()
    assert model(text, images).shape == (3, 8, 50)
    t, i = model(text, images, return_embeddings=True)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(3))
    loss = model(text, images, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_precomputed_image_tokens_match_images():
    model = tiny()
    text, images = batch()
    tokens = model.img_encoder(images)
    torch.testing.assert_close(model(text, image_tokens=tokens), model(text, images))


@pytest.mark.parametrize("options", [{}, SEED_OPTIONS])
def test_caption_logits_are_causal(options):
    model = tiny(**options)
    text, images = batch(n=10)
    logits = model(text, images)
    text2 = text.clone()
    text2[:, 6] = (text2[:, 6] % 49) + 1
    logits2 = model(text2, images)
    torch.testing.assert_close(logits[:, :6], logits2[:, :6])
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])


def test_bidirectional_contrastive_pass_sees_every_token_and_never_the_image():
    model = tiny()
    text, images = batch(n=10)
    base = model.embed_text(text)
    for t in (0, 5, 9):
        text2 = text.clone()
        text2[:, t] = (text2[:, t] % 49) + 1
        assert not torch.allclose(model.embed_text(text2), base)
    t1, _ = model(text, images, return_embeddings=True)
    t2, _ = model(text, torch.randn_like(images), return_embeddings=True)
    torch.testing.assert_close(t1, t2)


def test_causal_contrastive_pass_with_mean_pool_changes_with_last_token_only_through_itself():
    # with a causal pass, changing the last token cannot change earlier features
    model = tiny(contrastive_pass="causal")
    text, _ = batch(n=6)
    x1 = model.embed_text(text)
    text2 = text.clone()
    text2[:, -1] = (text2[:, -1] % 49) + 1
    assert not torch.allclose(model.embed_text(text2), x1)


@pytest.mark.parametrize("options", [{}, SEED_OPTIONS, dict(contrastive_loss="softmax", image_pool="attention", num_img_queries=4)])
def test_right_padding_changes_neither_embedding_nor_loss(options):
    model = tiny(**options)
    text, images = batch(n=7)
    text[:, -1] = 0  # one pad already in every row
    text[0, 4:] = 0
    padded = F.pad(text, (0, 5), value=0)
    torch.testing.assert_close(model.embed_text(text), model.embed_text(padded), atol=1e-5, rtol=1e-5)
    parts = model.compute_losses(text, images)
    parts_padded = model.compute_losses(padded, images)
    for a, b in zip(parts, parts_padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cross_attend_layers_are_exactly_where_asked():
    model = tiny(depth=6, cross_attend_layers=(4, 5, 6))
    assert [i + 1 for i, layer in enumerate(model.layers) if layer.cross is not None] == [4, 5, 6]
    model = tiny(depth=6, cross_attend_every=2)
    assert [i + 1 for i, layer in enumerate(model.layers) if layer.cross is not None] == [2, 4, 6]
    # the contrastive pass never runs a cross-attention block
    calls = []
    for layer in model.layers:
        if layer.cross is not None:
            layer.cross.register_forward_hook(lambda *a: calls.append(1))
    text, images = batch()
    model.embed_text(text)
    assert calls == []
    model(text, images)
    assert len(calls) == 3


def test_loss_parts_match_direct_computation():
    for kind in ("softmax", "focal"):
        model = tiny(contrastive_loss=kind, caption_loss_weight=2.0, contrastive_loss_weight=0.5)
        text, images = batch(n=9)
        text[1, 6:] = 0
        parts = model.compute_losses(text, images)
        logits = model(text[:, :-1], images)
        cap = caption_loss(logits, text[:, 1:], pad_id=0)
        t = model.embed_text(text)
        i = model.embed_image(images)
        scale = model.contrastive.logit_scale()
        if kind == "softmax":
            sim = scale * t @ i.t()
            labels = torch.arange(3)
            con = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels))
        else:
            con = focal_contrastive_loss(t, i, scale)
        torch.testing.assert_close(parts.caption, cap)
        torch.testing.assert_close(parts.contrastive, con)
        torch.testing.assert_close(parts.total, 2.0 * cap + 0.5 * con)


@pytest.mark.parametrize("layers", [(1,), (2,), (3,), (1, 3)])
@pytest.mark.parametrize("labels", [False, True])
def test_causal_passes_share_their_prefix_exactly(layers, labels):
    """With a causal contrastive pass the layers before the first cross-attention run once for
    both passes: losses and every gradient equal those of two separate passes."""
    torch.manual_seed(0)
    model = tiny(**SEED_OPTIONS, cross_attend_layers=layers).train()
    text, images = batch(n=9)
    text[1, 5:] = 0
    text[2, 8:] = 0
    lab = torch.randint(1, 50, text.shape) if labels else None
    lab = None if lab is None else lab.masked_fill(text == 0, 0)
    calls = []
    hooks = [layer.block.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(model.layers)]
    parts = model.compute_losses(text, images, labels=lab)
    for h in hooks:
        h.remove()
    first = layers[0] - 1  # blocks up to the first cross-attending layer run once, later ones twice
    assert sorted(calls) == sorted(list(range(first + 1)) + 2 * list(range(first + 1, 4)))
    got = torch.autograd.grad(parts.total, list(model.parameters()), allow_unused=True)
    inputs, targets = (text, lab) if labels else (text[:, :-1], text[:, 1:])
    img, context = model.image_embed_and_context(model.image_tokens(images))
    cap = caption_loss(model.decode(inputs, context), targets, pad_id=0)
    con = model.contrastive(model.embed_text(text), img)
    torch.testing.assert_close(parts.caption, cap)
    torch.testing.assert_close(parts.contrastive, con)
    want = torch.autograd.grad(cap + con, list(model.parameters()), allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4, msg=name)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny(contrastive_loss="softmax").train()
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


def test_pass_order_is_randomised_in_training():
    model = tiny().train()
    order = []
    model.embed_text = (lambda f: (lambda *a, **k: order.append("c") or f(*a, **k)))(model.embed_text)
    model.decode_hidden = (lambda f: (lambda *a, **k: order.append("g") or f(*a, **k)))(model.decode_hidden)
    text, images = batch()
    firsts = set()
    for _ in range(12):
        order.clear()
        model.compute_losses(text, images)
        firsts.add(order[0])
    assert firsts == {"c", "g"}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randint(1, 50, (2, 5)), torch.randn(2, 3, 16, 16)), "images"),
        (lambda m: m(torch.randint(1, 50, (2, 5)), torch.randn(2, 1, 32, 32)), "images"),
        (lambda m: m(torch.full((2, 5), 50), torch.randn(2, 3, 32, 32)), "num_tokens"),
        (lambda m: m(torch.full((2, 5), -1), torch.randn(2, 3, 32, 32)), "text"),
        (lambda m: m(torch.randint(1, 50, (3, 5)), torch.randn(2, 3, 32, 32)), "batch"),
        (lambda m: m(torch.zeros(2, 5, dtype=torch.long), torch.randn(2, 3, 32, 32)), "empty"),
        (lambda m: m(torch.zeros(2, 0, dtype=torch.long), torch.randn(2, 3, 32, 32)), "text"),
        (lambda m: m(torch.randn(2, 5), torch.randn(2, 3, 32, 32)), "text"),
    ],
)
def test_bad_input_gives_clear_errors(call, match):
    model = tiny()
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)


def test_bad_config_gives_clear_errors():
    with pytest.raises(ValueError, match="cross_attend_layers"):
        MaMMUTConfig(depth=4, cross_attend_layers=(0, 5))
    with pytest.raises(ValueError, match="text_pool"):
        MaMMUTConfig(text_pool="max")
    with pytest.raises(TypeError):
        MaMMUT(dim=8, num_tokens=10, depth=1, bogus=3)


def test_image_tokens_of_the_wrong_width_are_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="image_dim"):
        model(torch.randint(1, 50, (2, 5)), image_tokens=torch.randn(2, 16, 47))

import pytest
import torch
import torch.nn.functional as F

from mammut.layers import KVCache
from mammut.models.flamingo import FlamingoConfig, FlamingoPaLM, GatedCrossAttentionBlock, PerceiverResampler

VIT = dict(image_size=8, patch_size=4, dim=24, depth=1, heads=2, dim_head=12)
MEDIA = 3  # media_token_id


def tiny(**kw) -> FlamingoPaLM:
    cfg = dict(num_tokens=40, dim=32, depth=4, heads=2, dim_head=16, media_token_id=MEDIA, cross_attn_every=2,
               perceiver_num_latents=4, perceiver_depth=1, num_time_embeds=4, vit=VIT)
    cfg.update(kw)
    return FlamingoPaLM(**cfg).eval()


def open_gates(model: torch.nn.Module, value: float = 1.0) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(value)


# interleaved: two text tokens, then media 1 at 2, media 2 at 5, media 3 at 7
TEXT = torch.tensor([[10, 11, MEDIA, 12, 13, MEDIA, 14, MEDIA, 15, 16, 17]])
SEGMENTS = [range(2, 5), range(5, 7), range(7, 11)]  # tokens that belong to media 1, 2, 3


# ---------------------------------------------------------------- seed README snippets
def test_seed_readme_perceiver_snippet():
    perceive = PerceiverResampler(
        dim=64,
        depth=2,
        dim_head=16,
        heads=2,
        num_latents=8,  # the number of latents to shrink your media sequence to, perceiver style
        num_time_embeds=4,  # say you have 4 images maximum in your dialogue
    )
    medias = torch.randn(1, 2, 32, 64)  # (batch, time, sequence length, dimension)
    perceived = perceive(medias)
    assert perceived.shape == (1, 2, 8, 64)


def test_seed_readme_gated_cross_attention_snippet():
    cross_attn = GatedCrossAttentionBlock(dim=64, dim_head=16, heads=2)
    text = torch.randn(1, 48, 64)
    perceived = torch.randn(1, 2, 8, 64)
    time_mask = torch.ones((1, 2)).bool()
    media_locations = torch.randint(0, 2, (1, 48)).bool()
    text = cross_attn(text, perceived, time_mask=time_mask, media_locations=media_locations)
    assert text.shape == (1, 48, 64)


def test_seed_readme_flamingo_palm_snippet():
    from vit_pytorch.extractor import Extractor
    from vit_pytorch.vit import ViT

    vit = ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2, mlp_dim=64, dropout=0.1, emb_dropout=0.1)
    vit = Extractor(vit, return_embeddings_only=True)
    flamingo_palm = FlamingoPaLM(
        num_tokens=20000, dim=64, depth=3, heads=2, dim_head=16, img_encoder=vit, media_token_id=3,
        cross_attn_every=3, perceiver_num_latents=8, perceiver_depth=1,
    )
    text = torch.randint(0, 20000, (2, 40))
    palm_logits = flamingo_palm(text)
    assert palm_logits.shape == (2, 40, 20000)
    images = torch.randn(2, 2, 3, 32, 32)
    time_mask = torch.ones((2, 2)).bool()
    flamingo_logits = flamingo_palm(text, images, time_mask=time_mask)
    assert flamingo_logits.shape == (2, 40, 20000)
    # the frozen encoder stays in eval mode (its dropout off) even in training mode
    flamingo_palm.train()
    assert not vit.training


# ---------------------------------------------------------------- perceiver resampler
def test_perceiver_shapes_and_keys_include_latents():
    perceive = PerceiverResampler(32, depth=1, dim_head=16, heads=2, num_latents=5, num_time_embeds=3, media_dim=24)
    seen = []
    perceive.layers[0].attn.register_forward_hook(lambda mod, args, out: seen.append(args[1].shape))
    assert perceive(torch.randn(2, 7, 24)).shape == (2, 1, 5, 32)  # (b, n, d): one media item
    assert seen[-1] == (2, 7 + 5, 32)  # keys/values: 7 media tokens + 5 latents
    assert perceive(torch.randn(2, 3, 7, 24)).shape == (2, 3, 5, 32)
    assert seen[-1] == (6, 12, 32)


def test_perceiver_media_are_resampled_independently_with_time_embeddings():
    perceive = PerceiverResampler(16, depth=1, dim_head=8, heads=2, num_latents=3, num_time_embeds=3)
    x = torch.randn(1, 3, 6, 16)
    out = perceive(x)
    x2 = x.clone()
    x2[:, 1] += torch.randn(6, 16)
    out2 = perceive(x2)
    assert torch.equal(out[:, 0], out2[:, 0]) and torch.equal(out[:, 2], out2[:, 2])
    assert not torch.allclose(out[:, 1], out2[:, 1])
    same = x[:, :1].expand(-1, 2, -1, -1)  # same image in two slots: the time embedding differs
    o = perceive(same)
    assert not torch.allclose(o[:, 0], o[:, 1])


def test_perceiver_videos_and_bad_input():
    perceive = PerceiverResampler(16, depth=1, dim_head=8, heads=2, num_latents=3, num_time_embeds=2, num_frame_embeds=4)
    assert perceive(torch.randn(2, 2, 4, 5, 16)).shape == (2, 2, 3, 16)
    with pytest.raises(ValueError, match="num_time_embeds"):
        perceive(torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match="num_frame_embeds"):
        perceive(torch.randn(1, 2, 5, 5, 16))
    with pytest.raises(ValueError, match="media_dim"):
        perceive(torch.randn(1, 2, 5, 8))
    no_video = PerceiverResampler(16, depth=1, dim_head=8, heads=2, num_latents=3)
    with pytest.raises(ValueError, match="num_frame_embeds"):
        no_video(torch.randn(1, 2, 4, 5, 16))


def test_perceiver_matches_the_anchor_package():
    anchor_mod = pytest.importorskip("flamingo_pytorch")
    anchor = anchor_mod.PerceiverResampler(dim=32, depth=2, dim_head=16, heads=2, num_latents=5, num_media_embeds=3)
    ours = PerceiverResampler(32, depth=2, dim_head=16, heads=2, num_latents=5, num_time_embeds=3)
    with torch.no_grad():
        ours.latents.copy_(anchor.latents)
        ours.time_emb.copy_(anchor.media_pos_emb[:, 0])
        ours.norm.weight.copy_(anchor.norm.weight)
        for mine, (attn, ff) in zip(ours.layers, anchor.layers):
            mine.norm_media.weight.copy_(attn.norm_media.weight)
            mine.norm_latents.weight.copy_(attn.norm_latents.weight)
            for name in ("to_q", "to_kv", "to_out"):
                getattr(mine.attn, name).weight.copy_(getattr(attn, name).weight)
            mine.norm_ff.weight.copy_(ff[0].weight)
            mine.ff.proj_in.weight.copy_(ff[1].weight)
            mine.ff.proj_out.weight.copy_(ff[3].weight)
    x = torch.randn(2, 3, 7, 32)
    torch.testing.assert_close(ours(x), anchor(x))


# ---------------------------------------------------------------- gated cross-attention
def block_and_media(immediate=True):
    block = GatedCrossAttentionBlock(32, dim_head=16, heads=2, only_attend_immediate_media=immediate)
    return block, torch.randn(1, TEXT.shape[1], 32), torch.randn(1, 3, 4, 32)


def test_gated_block_is_identity_at_init():
    block, x, media = block_and_media()
    assert torch.equal(block(x, media, media_locations=TEXT == MEDIA), x)
    assert torch.equal(block(x, media), x)


@pytest.mark.parametrize("immediate", [True, False])
def test_gated_block_masking_rule_token_by_token(immediate):
    block, x, media = block_and_media(immediate)
    open_gates(block)
    loc = TEXT == MEDIA
    base = block(x, media, media_locations=loc)
    for k, segment in enumerate(SEGMENTS):
        changed = media.clone()
        changed[:, k] += torch.randn_like(changed[:, k])
        out = block(x, changed, media_locations=loc)
        differs = (out - base).abs().amax(-1)[0] > 1e-6
        # immediate: exactly the tokens of media k; otherwise every token from media k on
        expected = [i in segment if immediate else i >= segment.start for i in range(TEXT.shape[1])]
        assert differs.tolist() == expected
        unchanged = ~torch.tensor(expected)
        assert torch.equal(out[0, unchanged], base[0, unchanged])


@pytest.mark.parametrize("immediate", [True, False])
def test_gated_block_tokens_before_any_media_get_exact_zero_attention(immediate):
    block, x, media = block_and_media(immediate)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)  # ff gate stays 0: the output is x + cross-attention
    out = block(x, media, media_locations=TEXT == MEDIA)
    assert torch.equal(out[:, :2], x[:, :2])
    assert (out[:, 2:] - x[:, 2:]).abs().amax(-1).min() > 0
    # reference for the attended tokens: plain cross-attention on the allowed media only
    h = block.norm(x)
    for k, segment in enumerate(SEGMENTS):
        allowed = media[:, k:k + 1] if immediate else media[:, :k + 1]
        ref = x + torch.tanh(torch.tensor(1.0)) * block.attn(h, allowed.flatten(1, 2))
        torch.testing.assert_close(out[:, segment], ref[:, segment])


@pytest.mark.parametrize("immediate", [True, False])
def test_gated_block_matches_the_anchor_package_except_its_leak(immediate):
    anchor_mod = pytest.importorskip("flamingo_pytorch")
    anchor = anchor_mod.GatedCrossAttentionBlock(dim=32, dim_head=16, heads=2, only_attend_immediate_media=immediate)
    block, x, media = block_and_media(immediate)
    with torch.no_grad():
        for p in (anchor.attn_gate, anchor.ff_gate, block.attn_gate, block.ff_gate):
            p.fill_(0.8)
        block.norm.weight.copy_(anchor.attn.norm.weight)
        for name in ("to_q", "to_kv", "to_out"):
            getattr(block.attn, name).weight.copy_(getattr(anchor.attn, name).weight)
        block.ff_norm.weight.copy_(anchor.ff[0].weight)
        block.ff.proj_in.weight.copy_(anchor.ff[1].weight)
        block.ff.proj_out.weight.copy_(anchor.ff[3].weight)
    loc = TEXT == MEDIA
    ours, theirs = block(x, media, media_locations=loc), anchor(x, media, media_locations=loc)
    torch.testing.assert_close(ours[:, 2:], theirs[:, 2:])
    if immediate:
        torch.testing.assert_close(ours[:, :2], theirs[:, :2])
    else:  # before any media the anchor attends uniformly to every media item; we attend to none
        assert not torch.allclose(ours[:, :2], theirs[:, :2])


def test_gated_block_time_mask_excludes_absent_media():
    block, x, media = block_and_media()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    out = block(x, media, media_locations=TEXT == MEDIA, time_mask=torch.tensor([[True, False, True]]))
    assert torch.equal(out[:, list(SEGMENTS[1])], x[:, list(SEGMENTS[1])])
    assert (out[:, list(SEGMENTS[2])] - x[:, list(SEGMENTS[2])]).abs().amax() > 0
    # without media_locations every token attends to every present media item
    out = block(x, media, time_mask=torch.tensor([[False, True, False]]))
    ref = x + torch.tanh(torch.tensor(1.0)) * block.attn(block.norm(x), media[:, 1])
    torch.testing.assert_close(out, ref)


def test_gated_block_bad_media_locations():
    block, x, media = block_and_media()
    with pytest.raises(ValueError, match="media_locations"):
        block(x, media, media_locations=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="media_locations"):
        block(x, media, media_locations=torch.zeros(1, TEXT.shape[1]))
    with pytest.raises(ValueError, match="time_mask"):
        block(x, media, time_mask=torch.ones(1, 2, dtype=torch.bool))


# ---------------------------------------------------------------- FlamingoPaLM
def test_lm_and_flamingo_logits_identity_at_init():
    model = tiny()
    images = torch.randn(1, 3, 3, 8, 8)
    lm = model(TEXT)
    assert lm.shape == (1, TEXT.shape[1], 40)
    assert torch.equal(model(TEXT, images), lm)  # gates at 0: the plain LM
    open_gates(model)
    assert not torch.allclose(model(TEXT, images), lm)


def test_model_masking_rule_token_by_token():
    model = tiny(cross_attn_every=1)
    open_gates(model, 0.5)
    images = torch.randn(1, 3, 3, 8, 8)
    hidden = []
    model.layers[0].xattn.register_forward_hook(lambda mod, args, out: hidden.append(out))
    base_logits = model(TEXT, images)
    base = hidden[-1]
    for k, segment in enumerate(SEGMENTS):
        changed = images.clone()
        changed[:, k] = torch.randn(3, 8, 8)
        logits = model(TEXT, changed)
        # after the first gated block: exactly the tokens of media k changed
        differs = (hidden[-1] - base).abs().amax(-1)[0] > 1e-6
        assert differs.tolist() == [i in segment for i in range(TEXT.shape[1])]
        # logits: nothing before media k's token changes (tokens before the first media never do)
        assert torch.equal(logits[:, :segment.start], base_logits[:, :segment.start])
        assert (logits[:, segment] - base_logits[:, segment]).abs().amax(-1).min() > 1e-6


def test_precomputed_embeds_match_images():
    model = tiny()
    open_gates(model)
    images = torch.randn(2, 3, 3, 8, 8)
    text = TEXT.expand(2, -1)
    embeds = model.img_encoder(images.flatten(0, 1)).unflatten(0, (2, 3))
    torch.testing.assert_close(model(text, image_embeds=embeds), model(text, images))


def test_videos():
    model = tiny(max_video_frames=3)
    open_gates(model)
    videos = torch.randn(2, 3, 2, 3, 8, 8)  # (b, media, frames, c, h, w)
    assert model(TEXT.expand(2, -1), videos=videos).shape == (2, TEXT.shape[1], 40)
    with pytest.raises(ValueError, match="max_video_frames"):
        tiny()(TEXT, videos=videos)


def test_cached_decoding_matches_full_forward_and_follows_beam_reorder():
    model = tiny(only_attend_immediate_media=True)
    open_gates(model, 0.7)
    # row 2 is left-padded; media tokens fall in the prompt and in the generated steps
    text = torch.cat((TEXT, torch.tensor([[0, 0, MEDIA, 12, 13, 10, MEDIA, 19, MEDIA, 21, 20]])), dim=0)
    keep = text != 0
    images = torch.randn(2, 3, 3, 8, 8)
    full = model(text, images)
    context = model.image_context(images=images)
    cache = KVCache()
    steps = [model.decode(text[:, :3], context, keep=keep[:, :3], cache=cache)]
    for i in range(3, text.shape[1]):
        steps.append(model.decode(text[:, i:i + 1], context, keep=keep[:, :i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)

    # beams: swap the rows after 6 tokens (media seen so far: 2 and 1); the count moves with them
    swap = torch.tensor([1, 0])
    cache = KVCache()
    first = model.decode(text[:, :6], context, keep=keep[:, :6], cache=cache)
    cache.reorder(swap)
    swapped_ctx = tuple(c.index_select(0, swap) for c in context)
    rest = model.decode(text[swap, 6:], swapped_ctx, keep=keep[swap], cache=cache)
    torch.testing.assert_close(first, full[:, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(rest, full[swap, 6:], atol=1e-5, rtol=0)


def test_loss_ignores_pad_and_media_tokens():
    model = tiny()
    open_gates(model)
    text = torch.tensor([[1, MEDIA, 20, MEDIA, 21, 0, 0], [1, MEDIA, 22, 23, MEDIA, 24, 25]])
    images = torch.randn(2, 2, 3, 8, 8)
    loss = model(text, images, return_loss=True)
    logits = model(text[:, :-1], images)
    targets = text[:, 1:]
    keep = (targets != 0) & (targets != MEDIA)
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))


def test_freezing_is_explicit_and_leaves_perceiver_and_gated_blocks_trainable():
    model = tiny()
    assert not any(p.requires_grad for p in model.img_encoder.parameters())  # always frozen
    images = torch.randn(1, 3, 3, 8, 8)
    model(TEXT, images, return_loss=True).backward()
    assert model.token_emb.weight.requires_grad  # a Flamingo forward flips nothing
    assert all(p.grad is None for p in model.img_encoder.parameters())

    model.freeze_for_flamingo()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("perceiver.") or ".xattn." in n}
    assert trainable == expected and expected
    assert any(n.startswith("perceiver.") for n in trainable) and any(".xattn." in n for n in trainable)
    built_frozen = tiny(freeze_lm=True)
    assert {n for n, p in built_frozen.named_parameters() if p.requires_grad} == expected
    model.freeze_for_flamingo(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("img_encoder.")}


def test_bad_input_is_a_clear_error():
    model = tiny()
    images = torch.randn(1, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="media tokens"):
        model(TEXT, images)  # 3 media tokens, 2 images
    with pytest.raises(ValueError, match="5-D"):
        model(TEXT, images[:, 0])
    with pytest.raises(ValueError, match="time_mask"):
        model(TEXT, torch.randn(1, 3, 3, 8, 8), time_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_time_embeds"):
        model(TEXT, torch.randn(1, 5, 3, 8, 8))
    with pytest.raises(ValueError, match="image_embeds"):
        model(TEXT, image_embeds=torch.randn(1, 4, 24))
    with pytest.raises(ValueError, match="image_dim"):
        model(TEXT, image_embeds=torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match="time_mask"):
        model(TEXT, time_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="media_token_id"):
        FlamingoConfig(media_token_id=0, pad_id=0)


# ---------------------------------------------------------------- learning
COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
BOS, FIRST_COLOUR = 1, 4  # vocab: pad 0, bos 1, media 3, colour words 4..8


def colour_batch(b: int, t: int = 3, generator: torch.Generator | None = None):
    """Rows ``bos <img> c1 <img> c2 ...`` with 1..t solid-colour images; pads after."""
    colours = torch.randint(len(COLOURS), (b, t), generator=generator)
    count = torch.randint(1, t + 1, (b,), generator=generator)
    time_mask = torch.arange(t) < count[:, None]
    images = COLOURS[colours][..., None, None].expand(b, t, 3, 8, 8).clone()
    images += 0.1 * torch.randn(images.shape, generator=generator)
    text = torch.zeros(b, 1 + 2 * t, dtype=torch.long)
    text[:, 0] = BOS
    text[:, 1::2] = torch.where(time_mask, MEDIA, 0)
    text[:, 2::2] = torch.where(time_mask, colours + FIRST_COLOUR, 0)
    return text, images, time_mask


def test_tiny_flamingo_learns_the_colour_of_the_latest_image():
    torch.manual_seed(0)
    model = tiny(num_tokens=FIRST_COLOUR + len(COLOURS), depth=2, cross_attn_every=1, num_time_embeds=3).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        text, images, time_mask = colour_batch(32)
        loss = model(text, images, time_mask=time_mask, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    text, images, time_mask = colour_batch(256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = model(text[:, :-1], images, time_mask=time_mask).argmax(-1)
    is_colour = text[:, 1:] >= FIRST_COLOUR
    accuracy = (pred == text[:, 1:])[is_colour].float().mean().item()
    assert accuracy > 0.9, accuracy  # chance: 1 / 5

"""What every training, embedding and generation entry point does with its inputs, for every
model that trains (MaMMUT, CoCa, FlamingoPaLM):

- labels: ``-100`` (Hugging Face's ignore index) counts exactly as pad (no loss, no gradient,
  not in the token mean); any other label outside ``[0, num_tokens)`` is a ValueError naming
  ``labels``, the expected range and the bad values, raised before any compute;
- non-finite pixels / image tokens / media / context: a ValueError naming the argument and
  counting the NaN and inf values, before any compute, checked once per call (never per
  decoding step);
- generation never changes the model's mode: on a model left in train mode (dropout, patch
  dropout) it gives, in any number of threads at once, exactly the tokens of an eval-mode run.
"""

import logging
import threading

import pytest
import torch
from torch import nn

from mammut import MaMMUT
from mammut.generation import generate
from mammut.layers import FeedForward, dropout_enabled, no_dropout
from mammut.losses import IGNORE_INDEX, caption_loss, linear_caption_loss
from mammut.models import _checks
from mammut.models.coca import CoCa
from mammut.models.flamingo import FlamingoPaLM

VOCAB, BOS, EOS, MEDIA = 40, 1, 2, 3
VIT = dict(image_size=16, patch_size=4, dim=24, depth=1, heads=2, dim_head=12)
KINDS = ["mammut", "mammut_seed", "coca", "flamingo"]
NAN_MESSAGE = "images: expected finite pixel values, got 3 NaN and 1 inf"


def build(kind: str, *, dropout: float = 0.0, patch_dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    vit = dict(VIT, patch_dropout=patch_dropout, cropped_pos_emb=patch_dropout > 0)
    common = dict(num_tokens=VOCAB, dim=32, heads=2, dim_head=16, bos_id=BOS, eos_id=EOS, vit=vit, dropout=dropout)
    if kind == "mammut":
        model = MaMMUT(depth=2, **common)
    elif kind == "mammut_seed":  # causal contrastive pass: the two passes share their prefix
        model = MaMMUT(depth=2, contrastive_pass="causal", text_pool="cls", image_pool="attention",
                       contrastive_loss="softmax", num_img_queries=4, cross_attend_layers=(2,), **common)
    elif kind == "coca":
        model = CoCa(unimodal_depth=1, multimodal_depth=1, num_img_queries=4, **common)
    else:
        model = FlamingoPaLM(depth=2, cross_attn_every=1, media_token_id=MEDIA, perceiver_num_latents=4,
                             perceiver_depth=1, num_time_embeds=2, max_video_frames=2, **common)
        with torch.no_grad():  # open the tanh gates so the media matter
            for name, p in model.named_parameters():
                if name.endswith("_gate"):
                    p.fill_(1.0)
    with torch.no_grad():  # clear-cut next-token choices (random init is near uniform)
        model.token_emb.weight.mul_(10.0)
    return model.eval()


def images_for(kind: str, b: int = 2, seed: int = 1) -> torch.Tensor:
    x = torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return x.unsqueeze(1) if kind == "flamingo" else x  # Flamingo: (b, media, c, h, w)


def text_for(kind: str, b: int = 2, n: int = 7) -> torch.Tensor:
    text = torch.randint(4, VOCAB, (b, n), generator=torch.Generator().manual_seed(2))
    text[:, 0] = BOS
    if kind == "flamingo":
        text[:, 1] = MEDIA
    return text


def prompt_for(kind: str, b: int = 2) -> torch.Tensor:
    return torch.tensor([[BOS, MEDIA]] * b) if kind == "flamingo" else torch.full((b, 1), BOS)


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    flat[[0, 5, 17]] = float("nan")
    flat[-1] = float("inf")
    return x


def count_encoder_calls(model: nn.Module) -> list[int]:
    """Forward pre-hooks on the image encoder and (Flamingo) the perceiver: nothing heavy may run."""
    calls: list[int] = []
    for module in (model.img_encoder, getattr(model, "perceiver", None)):
        if module is not None:
            module.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor | None]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


# ============================================================================ 1. labels
@pytest.mark.parametrize("pad_id", [0, 7])
def test_loss_functions_ignore_minus_100_exactly_as_pad(pad_id):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    labels = torch.randint(1, 11, (3, 6), generator=g)
    labels[labels == pad_id] = 1  # pad only where ignored below
    ignored = torch.zeros(3, 6, dtype=torch.bool)
    ignored[0, 4:], ignored[1, 0], ignored[2, 2] = True, True, True
    as_pad, as_minus = labels.masked_fill(ignored, pad_id), labels.masked_fill(ignored, IGNORE_INDEX)
    mixed = as_pad.clone()
    mixed[0, 5] = IGNORE_INDEX  # pad and -100 in one row
    for fn in (
        lambda y: caption_loss(hidden @ weight.t(), y, pad_id=pad_id),
        lambda y: linear_caption_loss(hidden, weight, y, pad_id=pad_id),
        lambda y: linear_caption_loss(hidden, weight, y, pad_id=pad_id, chunk_size=4),
    ):
        want = fn(as_pad)
        want_grads = torch.autograd.grad(want, (hidden, weight))
        for y in (as_minus, mixed, as_minus.int()):
            got = fn(y)
            torch.testing.assert_close(got, want)
            for a, b in zip(torch.autograd.grad(got, (hidden, weight)), want_grads):
                torch.testing.assert_close(a, b)
    # not counted in the mean: the loss over the 14 kept tokens only
    keep = ~ignored
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t())[keep], labels[keep])
    torch.testing.assert_close(caption_loss(hidden @ weight.t(), as_minus, pad_id=pad_id), ref)
    # pad_id=None: -100 is the only ignored label
    torch.testing.assert_close(caption_loss(hidden @ weight.t(), as_minus, pad_id=None), ref)


@pytest.mark.parametrize("bad", [-5, -1, 11, 1000])
def test_loss_functions_reject_bad_labels_naming_range_and_values(bad):
    logits, hidden, weight = torch.randn(2, 4, 11), torch.randn(2, 4, 8), torch.randn(11, 8)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 0], [3, bad, 4, bad]])
    match = rf"labels: expected target ids in \[0, 11\) \(num_tokens\) or -100 .*got 2 bad value\(s\): \[{bad}\]"
    with pytest.raises(ValueError, match=match):
        caption_loss(logits, labels)
    with pytest.raises(ValueError, match=match):
        linear_caption_loss(hidden, weight, labels)
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        caption_loss(logits, labels.float())


def model_loss(kind: str, model: nn.Module, labels: torch.Tensor | None, images: torch.Tensor | None = None) -> torch.Tensor:
    text, images = text_for(kind), images_for(kind) if images is None else images
    return model(text, images, labels=labels, return_loss=True)


@pytest.mark.parametrize("kind", KINDS)
def test_models_ignore_minus_100_labels_exactly_as_pad(kind):
    model = build(kind).train()
    labels = torch.randint(4, VOCAB, text_for(kind).shape, generator=torch.Generator().manual_seed(3))
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[0, 5:], ignored[1, 1], ignored[1, 3] = True, True, True
    want = model_loss(kind, model, labels.masked_fill(ignored, 0))
    want_grads = grads(model, want)
    got = model_loss(kind, model, labels.masked_fill(ignored, IGNORE_INDEX))
    torch.testing.assert_close(got, want)
    for (name, _), a, b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], grads(model, got), want_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name)
    if kind != "flamingo":  # compute_losses takes labels too, and so does caption_loss_from_states
        parts = model.compute_losses(text_for(kind), images_for(kind), labels=labels.masked_fill(ignored, IGNORE_INDEX))
        torch.testing.assert_close(parts.total, want)
        states = torch.randn(2, 7, 32)
        torch.testing.assert_close(
            model.caption_loss_from_states(states, labels.masked_fill(ignored, IGNORE_INDEX)),
            model.caption_loss_from_states(states, labels.masked_fill(ignored, 0)),
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [-5, VOCAB])
def test_models_reject_bad_labels_before_any_compute(kind, bad):
    model = build(kind).train()
    calls = count_encoder_calls(model)
    labels = torch.randint(4, VOCAB, text_for(kind).shape)
    labels[1, 2] = bad
    match = rf"labels: expected target ids in \[0, {VOCAB}\) \(num_tokens\) or -100 .*got 1 bad value\(s\): \[{bad}\]"
    with pytest.raises(ValueError, match=match):
        model_loss(kind, model, labels)
    if kind != "flamingo":
        with pytest.raises(ValueError, match=match):
            model.compute_losses(text_for(kind), images_for(kind), labels=labels)
        with pytest.raises(ValueError, match=match):
            model.caption_loss_from_states(torch.randn(2, 7, 32), labels)
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 7\)"):
        model_loss(kind, model, labels[:, :5])
    assert calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_minus_100_in_text_points_to_labels(kind):
    model = build(kind)
    text = text_for(kind)
    text[0, -1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"text: expected token ids in \[0, 40\).*-100.*labels="):
        model(text, images_for(kind), return_loss=True)


# ============================================================================ 2. NaN / inf
def entry_points(kind: str):
    """Every way pixels get into the model: (name, call(model, images))."""
    text, prompt = text_for(kind), prompt_for(kind)
    calls = [
        ("loss", lambda m, x: m(text, x, return_loss=True)),
        ("logits", lambda m, x: m(text, x)),
        ("generate_greedy", lambda m, x: m.generate(x, prompt, max_new_tokens=4)),
        ("generate_sample", lambda m, x: m.generate(x, prompt, max_new_tokens=4, strategy="sample",
                                                    generator=torch.Generator().manual_seed(0))),
        ("generate_beam", lambda m, x: m.generate(x, prompt, max_new_tokens=4, strategy="beam", num_beams=2)),
        ("image_context", lambda m, x: m.image_context(x)),
    ]
    if kind == "flamingo":
        calls.append(("loss_train", lambda m, x: m.train()(text, x, return_loss=True)))
    else:
        calls += [
            ("embed_image", lambda m, x: m.embed_image(x)),
            ("embeddings", lambda m, x: m(text, x, return_embeddings=True)),
            ("compute_losses_train", lambda m, x: m.train().compute_losses(text, x)),
        ]
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_pixels_are_a_clear_error_before_compute(kind):
    model = build(kind)
    calls = count_encoder_calls(model)
    bad = with_nan(images_for(kind))
    for name, call in entry_points(kind):
        with pytest.raises(ValueError, match=NAN_MESSAGE):
            call(model, bad)
        assert calls == [], name
        model.eval()
    for name, call in entry_points(kind):  # the same calls run on finite pixels
        call(model, images_for(kind))
        model.eval()
    assert calls


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_tokens_media_and_context_are_a_clear_error(kind):
    model = build(kind)
    images = images_for(kind)
    prompt = prompt_for(kind)
    if kind == "flamingo":
        tokens = model.img_encoder(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        with pytest.raises(ValueError, match="image_embeds: expected finite values, got 3 NaN and 1 inf"):
            model(text_for(kind), image_embeds=with_nan(tokens), return_loss=True)
        videos = torch.randn(2, 1, 2, 3, 16, 16)
        with pytest.raises(ValueError, match="videos: expected finite pixel values, got 3 NaN and 1 inf"):
            model(text_for(kind), videos=with_nan(videos))
        model(text_for(kind), videos=videos)  # finite videos run
    else:
        tokens = model.img_encoder(images)
        calls = (lambda t: model(text_for(kind), image_tokens=t, return_loss=True), lambda t: model.embed_image(image_tokens=t))
        for call in calls:
            with pytest.raises(ValueError, match="image_tokens: expected finite values, got 3 NaN and 1 inf"):
                call(with_nan(tokens))
    for strategy in ("greedy", "sample"):
        with pytest.raises(ValueError, match="image_tokens: expected finite values, got 3 NaN and 1 inf"):
            generate(model, image_tokens=with_nan(tokens), prompt=prompt, max_new_tokens=3, strategy=strategy)
        context = model.image_context(images)
        media = context[0] if isinstance(context, tuple) else context
        bad = (with_nan(media), context[1]) if isinstance(context, tuple) else with_nan(media)
        with pytest.raises(ValueError, match="context: expected finite values, got 3 NaN and 1 inf"):
            generate(model, context=bad, prompt=prompt, max_new_tokens=3, strategy=strategy)
    ref = generate(model, images, prompt, max_new_tokens=3)
    assert torch.equal(generate(model, image_tokens=tokens, prompt=prompt, max_new_tokens=3), ref)
    assert torch.equal(generate(model, context=model.image_context(images), prompt=prompt, max_new_tokens=3), ref)


@pytest.mark.parametrize("kind", ["mammut", "coca", "flamingo"])
@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_finiteness_is_checked_once_per_generate_call_not_per_step(kind, strategy, monkeypatch):
    model = build(kind)
    seen = []
    real = _checks.check_finite

    def counting(name, x, *args, **kwargs):
        seen.append(name)
        return real(name, x, *args, **kwargs)

    monkeypatch.setattr(_checks, "check_finite", counting)
    monkeypatch.setattr("mammut.models.flamingo.check_finite", counting)
    out = generate(model, images_for(kind), prompt_for(kind), max_new_tokens=8, min_new_tokens=8, strategy=strategy)
    assert out.shape == (2, 8)
    assert seen == ["images"]


# ============================================================================ 3. mode and threads
def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("kind", ["mammut", "mammut_seed", "coca", "flamingo"])
def test_concurrent_generation_on_a_train_mode_model_equals_eval_and_keeps_train_mode(kind):
    model = build(kind, dropout=0.3, patch_dropout=0.5)
    images, prompt = images_for(kind), prompt_for(kind)

    def run(strategy: str, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, images, prompt, max_new_tokens=6, strategy=strategy, generator=g if strategy == "sample" else None)

    want = {("greedy", 0): run("greedy", 0), ("sample", 0): run("sample", 0), ("sample", 1): run("sample", 1)}
    assert not torch.equal(want["sample", 0], want["sample", 1])  # the seeds matter: sampling is tested
    model.train()
    train_modes = modes(model)
    # dropout and patch dropout act in this train-mode model outside generation
    text = text_for(kind)
    with torch.no_grad():
        assert not torch.equal(model(text, images), model(text, images))

    failures: list[str] = []

    def worker(i: int, barrier: threading.Barrier) -> None:
        for r in range(30):
            barrier.wait()
            for key in (("greedy", 0), ("sample", i)):
                got = run(*key)
                if got.shape != want[key].shape or not torch.equal(got, want[key]):
                    failures.append(f"thread {i} round {r} {key}: {got.tolist()} != {want[key].tolist()}")

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=worker, args=(i, barrier)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert modes(model) == train_modes
    if kind != "flamingo":  # Flamingo keeps its frozen image encoder in eval mode, by design
        assert all(m.training for m in model.modules())
    else:
        assert all(m.training for n, m in model.named_modules() if not n.startswith("img_encoder"))
    assert dropout_enabled()


def test_no_dropout_is_local_to_its_thread():
    ff = FeedForward(16, dropout=0.5).train()
    x = torch.randn(4, 16)
    entered, release = threading.Event(), threading.Event()
    inside: list[bool] = []

    def other() -> None:
        with no_dropout():
            entered.set()
            inside.append(torch.equal(ff(x), ff(x)))  # deterministic here, though ff is in train mode
            release.wait(10)
            inside.append(not dropout_enabled())

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    assert dropout_enabled() and not torch.equal(ff(x), ff(x))  # this thread still drops out
    release.set()
    t.join()
    assert inside == [True, True]
    with no_dropout():
        torch.testing.assert_close(ff(x), ff.eval()(x))
    assert ff.training is False and dropout_enabled()


def test_caption_leaves_the_mode_alone():
    model = build("mammut", dropout=0.3, patch_dropout=0.5)
    images, prompt = images_for("mammut"), prompt_for("mammut")

    class Tok:
        def decode(self, ids):
            return [" ".join(map(str, row)) for row in ids.tolist()]

    want = model.caption(images, Tok(), prompt=prompt, max_new_tokens=5)
    model.train()
    assert model.caption(images, Tok(), prompt=prompt, max_new_tokens=5) == want
    assert all(m.training for m in model.modules())


class _ForeignEncoder(nn.Module):
    """An encoder mammut does not know (as a timm / Hugging Face one): its dropout is its own."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 16 * 16, 4 * 24)
        self.drop = nn.Dropout(0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(images.flatten(1))).view(images.shape[0], 4, 24)


def test_generate_warns_once_about_train_mode_modules_it_cannot_reach(caplog):
    torch.manual_seed(0)
    model = MaMMUT(num_tokens=VOCAB, dim=32, depth=1, heads=2, dim_head=16, bos_id=BOS, image_dim=24,
                   img_encoder=_ForeignEncoder())
    images, prompt = images_for("mammut"), prompt_for("mammut")
    with caplog.at_level(logging.WARNING, logger="mammut.generation"):
        model.eval()
        generate(model, images, prompt, max_new_tokens=2)
        assert caplog.records == []
        model.train()
        generate(model, images, prompt, max_new_tokens=2)
        generate(model, images, prompt, max_new_tokens=2)
    assert len(caplog.records) == 1
    assert "img_encoder" in caplog.records[0].getMessage() and "model.eval()" in caplog.records[0].getMessage()
    assert model.training and model.img_encoder.drop.training

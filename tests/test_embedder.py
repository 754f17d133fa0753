"""mammut.Embedder: the one batched way to embed and caption with a loaded model, which the
evaluation (EvalModel), the search apps (ModelEncoder) and mammut.inference go through."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import mammut
from mammut import Embedder, ImagePreprocess
from mammut.loading import MissingComponent, MissingComponentError
from mammut.models import get_model_spec

pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

CAPTIONS = ["a red circle on grass", "two blue squares", "a green triangle near a red circle", "nothing at all",
            "a blue circle", "three small squares in a row", "a red square"]


@pytest.fixture(scope="module")
def tokenizer():
    from mammut.tokenizer import train_bpe

    tok = train_bpe(CAPTIONS * 4, vocab_size=290, min_frequency=1)
    tok.context_length = 12
    return tok


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_model_spec("mammut").build_tiny().eval()


@pytest.fixture
def images():
    return torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_it_is_exported():
    assert "Embedder" in mammut.__all__ and mammut.Embedder is Embedder


def test_fp32_embeddings_are_the_models_own(model, tokenizer, images):
    embedder = Embedder(model, ImagePreprocess(32), tokenizer)
    assert embedder.precision.name == "fp32" and embedder.device == torch.device("cpu")
    with torch.no_grad():
        want_images = model.embed_image(images)
        want_texts = model.embed_text(tokenizer(CAPTIONS))
    got_images, got_texts = embedder.embed_images(images), embedder.embed_texts(CAPTIONS)
    assert got_images.dtype == torch.float32 and got_images.device.type == "cpu" and not got_images.requires_grad
    torch.testing.assert_close(got_images, want_images)
    torch.testing.assert_close(got_texts, want_texts)
    torch.testing.assert_close(got_images.norm(dim=-1), torch.ones(len(images)))  # L2-normalised


def test_batch_size_does_not_change_the_result(model, tokenizer, images):
    whole = Embedder(model, tokenizer=tokenizer, batch_size=100)
    for size in (1, 2, 3):
        small = Embedder(model, tokenizer=tokenizer, batch_size=size)
        torch.testing.assert_close(small.embed_images(images), whole.embed_images(images))
        torch.testing.assert_close(small.embed_texts(CAPTIONS), whole.embed_texts(CAPTIONS))
        torch.testing.assert_close(whole.embed_texts(CAPTIONS, batch_size=size), whole.embed_texts(CAPTIONS))
        assert small.caption(images, max_new_tokens=4) == whole.caption(images, max_new_tokens=4)


def test_pil_images_go_through_the_preprocessing(model, images):
    preprocess = ImagePreprocess(32)
    pictures = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for im in images[:3]]
    embedder = Embedder(model, preprocess)
    torch.testing.assert_close(embedder.embed_images(pictures), embedder.embed_images(torch.stack([preprocess(p) for p in pictures])))
    missing = Embedder(model, MissingComponent("preprocess", "saved without it"))
    with pytest.raises(MissingComponentError, match="saved without it"):
        missing.embed_images(pictures)
    with pytest.raises(ValueError, match="expected at least one image"):
        embedder.embed_images([])


def test_the_model_runs_in_eval_mode_and_gets_its_mode_back(tokenizer, images):
    torch.manual_seed(0)
    model = get_model_spec("mammut").build_tiny().train()
    seen = []
    hook = model.img_encoder.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    embedder = Embedder(model, tokenizer=tokenizer)
    out = embedder.embed_images(images)
    hook.remove()
    assert seen and not any(seen) and model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(out, Embedder(model.eval(), tokenizer=tokenizer).embed_images(images))
    model.train()

    class Failing(nn.Module):
        def embed_image(self, images):
            raise RuntimeError("boom")

    failing = Failing().train()
    with pytest.raises(RuntimeError, match="boom"):
        Embedder(failing).embed_images(images)
    assert failing.training  # restored on the error path too


def test_captions_are_the_models_and_generate_pads_batches(model, tokenizer, images):
    embedder = Embedder(model, tokenizer=tokenizer, batch_size=3)
    want = model.caption(images, tokenizer, max_new_tokens=5)
    assert embedder.caption(images, max_new_tokens=5) == want
    ids = embedder.generate(images, max_new_tokens=5)
    assert ids.shape[0] == len(images) and ids.dtype == torch.long
    assert tokenizer.decode(ids) == want


def test_media_models_get_their_images_and_prompt(tokenizer, images):
    torch.manual_seed(0)
    flamingo = get_model_spec("flamingo_palm").build_tiny().eval()
    embedder = Embedder(flamingo, tokenizer=tokenizer)
    assert embedder.media and not embedder.contrastive and embedder.captioner
    cfg = flamingo.config
    want = flamingo.generate(images[:2].unsqueeze(1), prompt=[[cfg.bos_id, cfg.media_token_id]] * 2, max_new_tokens=3)
    torch.testing.assert_close(embedder.generate(images[:2], max_new_tokens=3), want)
    with pytest.raises(TypeError, match="expected a contrastive model with embed_image"):
        embedder.embed_images(images)


def test_bf16_runs_under_autocast_and_returns_float32(images):
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 4))

        def embed_image(self, pixels):
            seen.append(torch.is_autocast_enabled("cpu"))
            return nn.functional.normalize(pixels.mean(dim=(2, 3)) @ self.w, dim=-1)

    probe = Probe()
    bf16 = Embedder(probe, precision=mammut.precision.Precision("bf16", "bf16", "test"))
    out = bf16.embed_images(images)
    assert seen == [True] and out.dtype == torch.float32
    Embedder(probe, precision="fp32").embed_images(images)
    assert seen == [True, False]
    with pytest.raises(ValueError, match="precision: expected one of auto, fp32, bf16"):
        Embedder(probe, precision="half")
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        Embedder(probe, batch_size=0)


def test_the_three_wrappers_give_the_embedders_numbers(model, tokenizer, images):
    from mammut.apps.encoder import ModelEncoder
    from mammut.eval.model_source import EvalModel
    from mammut.inference import embed_images, embed_texts, generate_captions

    embedder = Embedder(model, ImagePreprocess(32), tokenizer)
    want_images, want_texts = embedder.embed_images(images), embedder.embed_texts(CAPTIONS)
    # mammut.inference: functions over a model (texts encoded as training does)
    torch.testing.assert_close(embed_images(model, images, batch_size=2), want_images)
    torch.testing.assert_close(embed_texts(model, tokenizer, CAPTIONS, 12, truncate=True),
                               Embedder(model, tokenizer=tokenizer).embed_texts(CAPTIONS))
    assert generate_captions(model, tokenizer, images, max_new_tokens=4, batch_size=3) == embedder.caption(
        images, max_new_tokens=4, strategy="greedy")
    # mammut eval's EvalModel
    ev = EvalModel(model, ImagePreprocess(32), tokenizer, "tiny")
    torch.testing.assert_close(ev.embed_images(images), want_images)
    torch.testing.assert_close(ev.embed_texts(CAPTIONS, batch_size=2), want_texts)
    assert ev.generate(images, max_new_tokens=4) == [c.strip() for c in embedder.caption(images, max_new_tokens=4)]
    # the search apps' ModelEncoder: numpy
    enc = ModelEncoder(model, ImagePreprocess(32), tokenizer, tokenizer, name="tiny")
    np.testing.assert_allclose(enc.embed_images(images), want_images.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc.embed_texts(CAPTIONS), want_texts.numpy(), rtol=1e-5, atol=1e-6)
    assert enc.caption(images[:2], max_new_tokens=4) == model.caption(images[:2], tokenizer, max_new_tokens=4)


def test_errors_name_what_is_missing(model, images, caplog):
    class Nothing(nn.Module):
        pass

    with pytest.raises(TypeError, match="expected a contrastive model with embed_image"):
        Embedder(Nothing()).embed_images(images)
    with pytest.raises(TypeError, match="expected a captioning model with generate"):
        Embedder(Nothing()).caption(images)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        Embedder(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(MissingComponentError, match="no tokenizer"):
        Embedder(model, tokenizer=MissingComponent("tokenizer", "no tokenizer saved")).embed_texts(["a"])
    with pytest.raises(ValueError, match="expected a tokenizer to embed texts, got NoneType"):
        Embedder(model).embed_texts(["a"])
    with pytest.raises(TypeError, match="texts: expected a list of strings"):
        Embedder(model).embed_texts("a red circle")
    with pytest.raises(ValueError, match=r"prompt: expected one prompt per image \(7\), got 1"):
        Embedder(model).generate(images, [[1]])
    with caplog.at_level(logging.INFO, logger="mammut.embedder"):
        Embedder(model, device="cpu")
    assert "moving" not in caplog.text  # already there: not moved

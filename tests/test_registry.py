"""Every registered model, driven by its registry spec (``ModelSpec``): the tiny config builds,
runs forward, learns, round-trips through ``save_pretrained``, decodes, trains through the
Trainer on each of its tasks, and keeps its losses under activation checkpointing and under
FSDP2 with 2 gloo ranks (the blocks named by the spec are the ones wrapped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mammut.models import get_model_spec, list_models
from mammut.train.distributed import apply_activation_checkpointing, transformer_blocks
from mammut.train.monitor import read_metrics

MODELS = list_models()
TRAIN_ONLY_FIELDS = ("num_tokens", "pad_id", "bos_id", "eos_id", "media_token_id")  # filled from the run's tokenizer


def inputs(name: str, b: int = 3, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, images) for a tiny model: media models take (b, 1, c, h, w) and a media token first."""
    spec = get_model_spec(name)
    cfg = spec.config_class(**spec.tiny)
    size = cfg.vit["image_size"]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, cfg.num_tokens, (b, n), generator=g)
    images = torch.rand(b, 3, size, size, generator=g)
    if spec.media:
        text[:, 0] = cfg.media_token_id
        images = images.unsqueeze(1)
    return text, images


@pytest.mark.parametrize("name", MODELS)
def test_spec_is_complete_and_tiny(name):
    spec = get_model_spec(name)
    model = spec.build_tiny()
    assert type(model) is spec.cls and spec.tasks and spec.block_types
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # every block type the spec names occurs in the model, and every occurrence gets wrapped
    found = {type(m) for m in transformer_blocks(model, spec.block_types)}
    assert found, f"{name}: no block of {spec.block_types}"


@pytest.mark.parametrize("name", MODELS)
def test_forward_gives_logits_and_a_loss(name):
    model = get_model_spec(name).build_tiny().eval()
    text, images = inputs(name)
    logits = model(text, images)
    assert logits.shape == (*text.shape, model.config.num_tokens) and torch.isfinite(logits).all()
    loss = model(text, images, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", MODELS)
def test_caption_loss_falls(name):
    model = get_model_spec(name).build_tiny().train()
    text, images = inputs(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.caption_loss(text, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_gives_the_same_outputs(name, tmp_path):
    spec = get_model_spec(name)
    model = spec.build_tiny().eval()
    text, images = inputs(name)
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / name))
    with torch.no_grad():
        torch.testing.assert_close(loaded.caption_loss(text, images), model.caption_loss(text, images), rtol=0, atol=0)
    assert loaded.config == model.config


@pytest.mark.parametrize("name", MODELS)
def test_generation(name):
    spec = get_model_spec(name)
    model = spec.build_tiny().eval()
    _, images = inputs(name, b=2)
    prompt = [[model.config.media_token_id]] * 2 if spec.media else None
    out = model.generate(images, prompt=prompt, max_new_tokens=5, min_new_tokens=5)
    assert out.shape == (2, 5) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < model.config.num_tokens


# ------------------------------------------------------------------------------ the contract
# each family's Protocols (mammut.models.contract), exactly: a new model adds its line
_CONTRASTIVE_CAPTIONER = {"ImageEmbedder", "TextEmbedder", "ContrastiveEmbedder", "Decoder", "Captioner",
                          "PositionBounded", "ImageSized"}
FAMILY_PROTOCOLS = {
    "mammut": (_CONTRASTIVE_CAPTIONER, ("image",)),
    "coca": (_CONTRASTIVE_CAPTIONER, ("image",)),
    "mammut_detector": (_CONTRASTIVE_CAPTIONER, ("image",)),  # a MaMMUT with detection heads
    "flamingo_palm": ({"Decoder", "Captioner", "MediaDecoder", "ImageSized"}, ("media_sequence",)),
}


@pytest.mark.parametrize("name", MODELS)
def test_each_model_satisfies_exactly_its_familys_protocols(name):
    from mammut.models.contract import ContrastiveEmbedder, MediaDecoder, capabilities

    assert name in FAMILY_PROTOCOLS, f"{name}: add its family's protocols and inputs to FAMILY_PROTOCOLS"
    protocols, kinds = FAMILY_PROTOCOLS[name]
    spec = get_model_spec(name)
    model = spec.build_tiny()
    assert capabilities(model) == protocols
    assert spec.inputs == kinds and spec.media == ("media_sequence" in kinds)
    # the input kind and the protocols agree: media sequences <-> a MediaDecoder
    assert isinstance(model, MediaDecoder) == spec.media
    if spec.media:
        assert model.media_token_id == model.config.media_token_id and not isinstance(model, ContrastiveEmbedder)


def test_model_spec_inputs_are_declared_kinds():
    from mammut.models.contract import INPUT_KINDS, ModelSpec

    assert set(INPUT_KINDS) == {"image", "video", "media_sequence"}
    spec = ModelSpec("toy", torch.nn.Linear, inputs=("video",))
    assert spec.inputs == ("video",) and not spec.media and spec.config_class is None
    with pytest.raises(AttributeError):
        spec.media = True  # read-only: inputs says it
    for bad in (("pixels",), (), "image"):
        with pytest.raises(ValueError, match="inputs: expected a non-empty tuple of"):
            ModelSpec("toy", torch.nn.Linear, inputs=bad)


class _DuckDecoder(torch.nn.Module):
    """Not a mammut model (no ModelBase): a wrapper with the decoder protocol's members only,
    plus a media token when it wraps a media model."""

    def __init__(self, inner, media=False):
        super().__init__()
        self.inner, self.config = inner, inner.config
        if media:
            self.media_token_id = inner.config.media_token_id

    def image_context(self, images=None, *, image_tokens=None):
        return self.inner.image_context(images, image_tokens=image_tokens)

    def decode(self, text, context=None, **kwargs):
        return self.inner.decode(text, context, **kwargs)

    def generate(self, images=None, prompt=None, **kwargs):
        from mammut.generation import generate

        return generate(self, images, prompt, **kwargs)


def test_a_duck_typed_object_satisfying_a_protocol_is_accepted():
    from mammut import Embedder
    from mammut.generation import generate
    from mammut.inference import embed_images
    from mammut.models.contract import (Captioner, ContrastiveEmbedder, Decoder, ImageEmbedder, MediaDecoder,
                                        capabilities, missing_members)

    class Embeds(torch.nn.Module):  # another library's contrastive model, say
        def embed_image(self, images):
            return torch.nn.functional.normalize(images.flatten(1)[:, :4], dim=-1)

        def embed_text(self, text):
            return torch.nn.functional.normalize(text[:, :4].float(), dim=-1)

    duck = Embeds()
    assert isinstance(duck, ContrastiveEmbedder) and capabilities(duck) == {"ImageEmbedder", "TextEmbedder",
                                                                           "ContrastiveEmbedder"}
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(embed_images(duck, images, batch_size=2), duck.embed_image(images))
    assert Embedder(duck).contrastive and not Embedder(duck).captioner

    model = get_model_spec("mammut").build_tiny().eval()
    _, pixels = inputs("mammut", b=2)
    wrapped = _DuckDecoder(model)
    assert isinstance(wrapped, Decoder) and isinstance(wrapped, Captioner) and not isinstance(wrapped, ImageEmbedder)
    assert not isinstance(wrapped, MediaDecoder)
    want = model.generate(pixels, max_new_tokens=4, min_new_tokens=4)
    torch.testing.assert_close(generate(wrapped, pixels, max_new_tokens=4, min_new_tokens=4), want)
    assert Embedder(wrapped).captioner and not Embedder(wrapped).media

    flamingo = get_model_spec("flamingo_palm").build_tiny().eval()
    media_duck = _DuckDecoder(flamingo, media=True)
    assert isinstance(media_duck, MediaDecoder) and Embedder(media_duck).media and not Embedder(media_duck).contrastive
    _, media = inputs("flamingo_palm", b=2)
    got = Embedder(media_duck).generate(media[:, 0], max_new_tokens=3)  # gets (b, 1, c, h, w) and [bos, <image>]
    cfg = flamingo.config
    torch.testing.assert_close(got, flamingo.generate(media, prompt=[[cfg.bos_id, cfg.media_token_id]] * 2,
                                                      max_new_tokens=3))

    class Half(torch.nn.Module):  # image_context but no decode / config: not a decoder
        def image_context(self, images=None, *, image_tokens=None):
            return images

    assert missing_members(Half(), Decoder) == ["config", "decode"]
    with pytest.raises(TypeError, match=r"decoder protocol, Half lacks \['config', 'decode'\]"):
        generate(Half(), pixels)


@pytest.mark.parametrize("name", MODELS)
def test_activation_checkpointing_keeps_losses_and_gradients(name):
    spec = get_model_spec(name)
    plain, wrapped = spec.build_tiny().train(), spec.build_tiny().train()
    wrapped.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(wrapped, spec.block_types) == len(transformer_blocks(plain, spec.block_types))
    text, images = inputs(name)
    a, b = plain.caption_loss(text, images), wrapped.caption_loss(text, images)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for (k, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------ the Trainer


def _config(tmp: Path, name: str, task: str) -> Path:
    """A run config for the model's tiny spec on ``task`` (emoji scenes, seconds to train)."""
    spec = get_model_spec(name)
    model = {"name": name, **{k: v for k, v in spec.tiny.items() if k not in TRAIN_ONLY_FIELDS}}
    cfg = {
        "model": model,
        "data": {"kind": "emoji", "image_size": spec.tiny["vit"]["image_size"], "num_emoji": 20, "vocab_size": 600,
                 "max_len": 24},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"task": task, "steps": 6, "batch_size": 8, "log_every": 1, "report": False, "progress": False,
                  "tensorboard": False, "threads": 1, "save_every": 0, "precision": "fp32"},  # compared closely
        "eval": {"n": 16, "max_new_tokens": 8},
    }
    from mammut.train.config import PRESET_DIR
    from mammut.train.task import get_task

    if "emoji" not in get_task(task).data_kinds:  # e.g. video tasks (clips, a video encoder): the task's tiny preset
        preset = yaml.safe_load((PRESET_DIR / f"{task}-tiny.yaml").read_text())
        assert preset["model"]["name"] == name, f"{task}-tiny.yaml: a preset for {name!r} expected"
        cfg = {**preset, "train": {**preset.get("train", {}), **cfg["train"]}, "eval": {**preset.get("eval", {}), **cfg["eval"]},
               "optim": {**preset.get("optim", {}), **cfg["optim"]}}
    path = tmp / f"{name}-{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"])


PAIRS = [(name, task) for name in MODELS for task in get_model_spec(name).tasks]


@pytest.mark.parametrize(("name", "task"), PAIRS)
def test_trainer_runs_every_model_on_every_task(name, task, tmp_path):
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    cfg = load_config(_config(tmp_path, name, task), ["--train.out_dir", str(tmp_path / "run"), "--train.steps", "3"])
    result = Trainer(cfg).fit()
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))


PARALLEL = [(name, get_model_spec(name).tasks[0], "fsdp") for name in MODELS] + [("mammut", "vqa", "ddp")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "task", "parallel"), PARALLEL)
def test_two_ranks_equal_one_process(name, task, parallel, tmp_path):
    """FSDP2 for every model; DDP where the task leaves parameters without gradient (VQA on a
    contrastive captioner: DDP must be told)."""
    config = _config(tmp_path, name, task)
    one, two = tmp_path / "one", tmp_path / "two"
    _train([sys.executable, "-m", "mammut.cli", "train", "--config", str(config), "--train.out_dir", str(one)])
    _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mammut.cli",
            "train", "--config", str(config), "--train.out_dir", str(two), "--train.parallel", parallel])
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

"""``train.init_from`` through a task's hooks (``Task.init_model_section``,
``Task.adapt_init_state``): a fine-tuning task may change the architecture it starts from (a
video encoder around the source's ViT, a detection head, more blocks) and map the source's
tensors onto it. Every source tensor must land somewhere with its shape; a parameter may stay
at its initialisation only under a prefix the task names.

A 2-step ``tiny`` MaMMUT run (ViT 2 blocks deep) is the source; a test task ``grow`` starts a
ViT one block deeper from it, its new block declared fresh."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import yaml

import mammut.models as models
import mammut.train.task as task_registry
from mammut.tasks.pretrain import Pretrain
from mammut.train.checkpointing import latest_checkpoint, load_weights
from mammut.train.config import ConfigError, load_config
from mammut.train.loop import Trainer

QUIET = ["--train.threads", "1", "--train.progress", "false", "--train.report", "false"]
NEW_BLOCK = "img_encoder.blocks.2."


class Grow(Pretrain):
    """Pretraining on a ViT one block deeper than the source's; the new block starts fresh."""

    name = "grow"
    fresh: tuple[str, ...] = (NEW_BLOCK,)
    rename: dict[str, str] = {}

    @classmethod
    def init_model_section(cls, cfg, model, source):
        out = task_registry.fine_tune_model_section({**model, "name": source["name"]}, source)
        return {**out, "vit": {**source["vit"], "depth": source["vit"]["depth"] + 1}}

    def adapt_init_state(self, state, model):
        return {self.rename.get(k, k): v for k, v in state.items()}, self.fresh


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("src") / "tiny"
    Trainer(load_config("tiny", ["--train.out_dir", str(run), "--train.steps", "2", *QUIET])).fit()
    return run


@pytest.fixture
def grow(monkeypatch):
    task_registry.list_tasks()  # the built-in tasks' entry points loaded before the copy
    monkeypatch.setattr(task_registry, "_TASKS", dict(task_registry._TASKS))
    task_registry.register_task(Grow)
    spec = models.get_model_spec("mammut")
    monkeypatch.setitem(models._REGISTRY, "mammut", dataclasses.replace(spec, tasks=(*spec.tasks, "grow")))
    return Grow


def _cfg(run, source, *extra):
    return load_config("tiny", ["--train.task", "grow", "--train.init_from", str(source), "--train.out_dir", str(run),
                                "--train.steps", "1", *QUIET, *extra])


def test_a_task_grows_the_source_model_and_keeps_every_source_tensor(grow, source, tmp_path, caplog):
    before = load_weights(latest_checkpoint(source) / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="mammut.train.loop"):
        trainer = Trainer(_cfg(tmp_path / "run", source))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # every source tensor, in place
    new = sorted(k for k in state if k not in before)
    assert new and all(k.startswith(NEW_BLOCK) for k in new)
    assert f"{len(new)} tensors new in this model, kept at their initialisation" in caplog.text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert saved["vit"]["depth"] == 3  # the task's section is the run's: the run reloads as trained
    trainer.fit()


def test_a_parameter_missing_outside_the_declared_prefixes_stops_the_run(grow, source, tmp_path, monkeypatch):
    monkeypatch.setattr(Grow, "fresh", ())
    with pytest.raises(ConfigError, match=r"^train\.init_from: weights do not fit the model \(missing "
                                          r"\['img_encoder\.blocks\.2\..*unexpected \[\], shapes \[\]\)"):
        Trainer(_cfg(tmp_path / "run", source))


def test_a_source_tensor_without_a_place_stops_the_run(grow, source, tmp_path, monkeypatch):
    monkeypatch.setattr(Grow, "rename", {"contrastive.logit_scale.log_scale": "renamed"})
    with pytest.raises(ConfigError, match=r"unexpected \['renamed'\]"):
        Trainer(_cfg(tmp_path / "run", source))


def test_a_shape_mismatch_is_named(grow, source, tmp_path, monkeypatch):
    monkeypatch.setattr(Grow, "init_model_section", classmethod(
        lambda cls, cfg, model, src: {**src, "vit": {**src["vit"], "depth": 3, "dim_head": 16}}))
    with pytest.raises(ConfigError, match=r"shapes \['img_encoder\.blocks\.0\.attn\.to_out\.weight \(64, 64\) != "
                                          r"\(64, 32\)'"):
        Trainer(_cfg(tmp_path / "run", source))

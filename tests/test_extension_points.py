"""Application-side extension points of training: data kinds registered by their readers and
checked against the run's task (no fixed list), a task's own ``task_options:`` section checked
by the config's typed coercion, and nested micro-batches moved to the device whole. A toy task
and a toy data kind are registered here, in the test, and trained by the Trainer."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch
import yaml

import mammut.models as models
import mammut.tasks.base as task_base
import mammut.train.data as train_data
from mammut.tasks import Task, register_task
from mammut.train.config import ConfigError, config_from_dict, config_to_dict, load_config
from mammut.train.data import get_data_kind, list_data_kinds, register_data_kind
from mammut.train.distributed import to_device

TINY = "tiny"
QUIET = ["--train.threads", "1", "--train.progress", "false", "--train.report", "false"]


@dataclasses.dataclass
class ToyOptions:
    boxes_per_image: int = 2
    box_weight: float = 0.0


class ToyTask(Task):
    """Pretraining on emoji scenes read as the ``toy`` kind, each image with a list of boxes."""

    name = "toy"
    data_kinds = ("toy",)
    options = ToyOptions
    seen: list[Any] = []

    def loss(self, model, batch):
        boxes = batch["boxes"]
        dev = next(model.parameters()).device
        assert isinstance(boxes, list) and all(b.device == dev for b in boxes)  # moved with the batch
        assert isinstance(batch["meta"], tuple) and batch["meta"][0] == "toy"
        type(self).seen.append([tuple(b.shape) for b in boxes])
        out = model.compute_losses(batch["text"], batch["images"], token_share=batch.get("token_share"))
        extra = sum(b.sum() for b in boxes) * self.cfg.task_options.box_weight
        return {"loss": out.total + extra}

    def train_batches(self, tokenizer, *, rank, world_size, start_step):
        t, opts = self.cfg.train, self.cfg.task_options
        reader = get_data_kind(self.cfg.data.kind).reader
        for step, micro in enumerate(reader(self.cfg.data, tokenizer, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                            seed=t.seed, rank=rank, world_size=world_size, start_step=start_step,
                                            steps=t.steps), start=start_step):
            yield [{"images": images, "text": text, "meta": ("toy", step),
                    "boxes": [torch.rand(opts.boxes_per_image, 4) for _ in range(len(images))]}
                   for images, text in micro]


@pytest.fixture
def toy(monkeypatch):
    """The toy data kind and task registered for one test (the registries restored after)."""
    monkeypatch.setattr(train_data, "_DATA_KINDS", dict(train_data._DATA_KINDS))
    monkeypatch.setattr(task_base, "_TASKS", dict(task_base._TASKS))
    emoji = get_data_kind("emoji")
    register_data_kind("toy", lambda cfg, tokenizer, **kw: emoji.reader(cfg, tokenizer, **kw), corpus=emoji.corpus)
    register_task(ToyTask)
    spec = models.get_model_spec("mammut")  # the model's registry entry lists the tasks it trains on
    monkeypatch.setitem(models._REGISTRY, "mammut", dataclasses.replace(spec, tasks=(*spec.tasks, "toy")))
    ToyTask.seen = []
    return ToyTask


def test_data_kind_is_checked_against_the_tasks_kinds():
    assert {"emoji", "csv", "webdataset"} <= set(list_data_kinds())
    with pytest.raises(ConfigError, match=r"^data\.kind: expected one of \['emoji', 'csv', 'webdataset'\] \(the data "
                                          r"kinds train\.task='pretrain' reads\), got 'parquet'$"):
        load_config(TINY, ["--data.kind", "parquet"])
    with pytest.raises(ConfigError, match=r"^data\.kind: expected one of \['emoji'\] \(the data kinds "
                                          r"train\.task='vqa' reads\), got 'csv'$"):
        load_config(TINY, ["--train.task", "vqa", "--data.kind", "csv", "--data.path", "x.csv"])
    with pytest.raises(ConfigError, match=r"data\.path: expected a file or shard pattern for data\.kind='webdataset'"):
        load_config(TINY, ["--data.kind", "webdataset"])


def test_a_task_without_options_takes_no_section():
    assert "task_options" not in config_to_dict(load_config(TINY))  # config.yaml as before
    assert config_from_dict({"task_options": {}}).task_options is None
    assert config_from_dict({"task_options": None}).task_options is None
    with pytest.raises(ConfigError, match=r"^task_options: expected no section \(train\.task='pretrain' takes no options\)"):
        load_config(TINY, ["--task_options.boxes_per_image", "3"])


def test_a_registered_task_reads_a_registered_kind_with_its_own_options(toy):
    with pytest.raises(ConfigError, match=r"data\.kind: expected one of \['toy'\] \(the data kinds train\.task='toy'"):
        load_config(TINY, ["--train.task", "toy"])
    args = ["--train.task", "toy", "--data.kind", "toy"]
    cfg = load_config(TINY, [*args, "--task_options.boxes_per_image", "3"])
    assert cfg.task_options == ToyOptions(boxes_per_image=3)
    assert load_config(TINY, args).task_options == ToyOptions()  # defaults without a section
    with pytest.raises(ConfigError, match=r"^task_options\.boxes_per_image: expected an integer, got 'many'"):
        load_config(TINY, [*args, "--task_options.boxes_per_image", "many"])
    with pytest.raises(ConfigError, match=r"^task_options\.box_weigth: unknown key \(did you mean 'box_weight'\?\)"):
        load_config(TINY, [*args, "--task_options.box_weigth", "1"])
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))  # what the run's config.yaml holds
    assert saved["task_options"] == {"boxes_per_image": 3, "box_weight": 0.0}
    assert config_from_dict(saved).task_options == cfg.task_options


def test_a_kind_a_task_lists_needs_a_reader(toy, monkeypatch):
    monkeypatch.setattr(ToyTask, "data_kinds", ("toy", "parquet"))
    with pytest.raises(ConfigError, match=r"^data\.kind: expected a data kind with a registered reader .*got 'parquet'"):
        load_config(TINY, ["--train.task", "toy", "--data.kind", "parquet"])


def test_trainer_moves_nested_batches_of_a_registered_task(toy, tmp_path):
    from mammut.train.loop import Trainer

    cfg = load_config(TINY, ["--train.task", "toy", "--data.kind", "toy", "--task_options.boxes_per_image", "3",
                             "--task_options.box_weight", "0.01", "--train.steps", "2", "--train.batch_size", "4",
                             "--train.grad_accum", "2", "--train.out_dir", str(tmp_path / "run"), *QUIET])
    result = Trainer(cfg).fit()
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert toy.seen == [[(3, 4), (3, 4)]] * 4  # 2 steps x 2 micro-batches of 2 images, 3 boxes each
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["task_options"]["boxes_per_image"] == 3


Pair = namedtuple("Pair", ["image", "label"])


def test_to_device_moves_every_tensor_of_a_nested_batch():
    batch = {"images": torch.zeros(2, 3), "boxes": [torch.ones(1, 4), torch.ones(3, 4)], "n": 2, "name": "x",
             "pairs": (Pair(torch.zeros(1), 7), None), "deep": {"a": [{"b": torch.ones(2)}]}}
    moved = to_device(batch, "meta")
    assert moved["images"].device.type == "meta" and [b.shape for b in moved["boxes"]] == [(1, 4), (3, 4)]
    assert all(b.device.type == "meta" for b in moved["boxes"]) and moved["deep"]["a"][0]["b"].device.type == "meta"
    assert moved["n"] == 2 and moved["name"] == "x" and moved["pairs"][1] is None
    pair = moved["pairs"][0]
    assert isinstance(pair, Pair) and pair.image.device.type == "meta" and pair.label == 7
    assert isinstance(moved["pairs"], tuple) and isinstance(moved["boxes"], list)
    assert batch["images"].device.type == "cpu"  # the input is left as it was

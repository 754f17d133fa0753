"""Application-side extension points of training: data kinds registered by their readers and
checked against the run's task (no fixed list), a task's own ``task_options:`` section checked
by the config's typed coercion, nested micro-batches moved to the device whole, and tasks found
through the entry points of the group ``mammut.tasks`` (how the built-in tasks and another
package's are registered). A toy task and a toy data kind are registered here, in the test, and
trained by the Trainer."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
from collections import namedtuple
from typing import Any

import pytest
import torch
import yaml

import mammut.models as models
import mammut.train.task as task_registry
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
    task_registry.list_tasks()  # the built-in tasks' entry points loaded before the copy
    monkeypatch.setattr(task_registry, "_TASKS", dict(task_registry._TASKS))
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


# ----------------------------------------------------------------------------- entry points


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """``add(name, value)``: one more entry point of the group ``mammut.tasks``, next to the
    installed ones, as another installed package would declare it; the registry starts afresh
    (restored after). A module ``plugin_tasks_for_test`` in ``tmp_path`` plays the package."""
    real = importlib.metadata.entry_points
    extra: list[importlib.metadata.EntryPoint] = []

    def fake(**params):
        eps = list(real(**params))
        return eps + [ep for ep in extra if ep.group == params.get("group")]

    (tmp_path / "plugin_tasks_for_test.py").write_text(
        "from mammut.tasks import Task\n\n\n"
        "class Plugged(Task):  # no decorator: the entry point registers it\n"
        "    name = 'plugged'\n    data_kinds = ('emoji',)\n\n\n"
        "class Misnamed(Task):\n    name = 'other'\n\n\nNOT_A_TASK = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(task_registry, "_TASKS", {})
    monkeypatch.setattr(task_registry, "_entry_points_loaded", False)
    yield lambda name, value: extra.append(importlib.metadata.EntryPoint(name, value, task_registry.ENTRY_POINT_GROUP))
    sys.modules.pop("plugin_tasks_for_test", None)


def test_the_built_in_tasks_are_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="mammut.tasks")}
    assert eps == {"pretrain": "mammut.tasks.pretrain:Pretrain", "vqa": "mammut.tasks.vqa:Vqa",
                   "interleaved": "mammut.tasks.interleaved:Interleaved", "detection": "mammut.tasks.detection:Detection",
                   "video": "mammut.tasks.video:VideoPretrain", "videoqa": "mammut.tasks.videoqa:VideoQa"}
    found = {name: task_registry.get_task(name) for name in task_registry.list_tasks()}
    assert {name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in found.items()} == eps
    from mammut.tasks.base import get_task as old  # the old import paths still work

    assert old is task_registry.get_task and Task is task_registry.Task


def test_a_task_declared_as_an_entry_point_is_found(entry_points):
    entry_points("plugged", "plugin_tasks_for_test:Plugged")
    cls = task_registry.get_task("plugged")
    assert cls.__module__ == "plugin_tasks_for_test" and issubclass(cls, Task)
    assert task_registry.list_tasks() == ["detection", "interleaved", "plugged", "pretrain", "video", "videoqa", "vqa"]
    with pytest.raises(ValueError, match=r"^train\.task: expected one of \['detection', 'interleaved', 'plugged', "
                                         r"'pretrain', 'video', 'videoqa', 'vqa'\], got 'nope'$"):
        task_registry.get_task("nope")


@pytest.mark.parametrize("value, says", [
    ("no_such_module_for_mammut_test:Task", r"failed to load: ModuleNotFoundError: No module named "
                                            r"'no_such_module_for_mammut_test'"),
    ("plugin_tasks_for_test:Missing", r"failed to load: AttributeError: .*Missing"),
    ("plugin_tasks_for_test:NOT_A_TASK", r"gives 3, not a Task subclass"),
    ("plugin_tasks_for_test:Misnamed", r"gives a task named 'other'; the entry point's name must be the task's name"),
], ids=["no-module", "no-attribute", "not-a-task", "misnamed"])
def test_a_broken_entry_point_is_named(entry_points, value, says):
    entry_points("broken", value)
    where = rf"^task 'broken': entry point broken = '{value}' \(group 'mammut\.tasks'\) "
    for lookup in (lambda: task_registry.get_task("pretrain"), task_registry.list_tasks):  # every look-up says so
        with pytest.raises(task_registry.TaskEntryPointError, match=where + says):
            lookup()


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

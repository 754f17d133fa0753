"""Run configuration: a YAML file plus ``--key value`` dotted overrides, checked by type.

A config has five sections, and a sixth for a task that declares options::

    model:   name: <registry name>, then that model's config fields (e.g. MaMMUTConfig);
             num_tokens / pad_id / bos_id / eos_id left null are filled from the tokenizer.
    data:    DataConfig   (data.kind: a kind the task reads, e.g. emoji scenes, csv/tsv or
             webdataset; tokenizer; caption length)
    optim:   OptimConfig  (AdamW, cosine schedule with warm-up, clipping)
    train:   LoopConfig   (steps, batch, accumulation, precision, parallelism, logging, saving)
    eval:    EvalConfig   (held-out set size, zero-shot prompts, caption length)
    task_options:         the options dataclass of the run's task (``Task.options``), if it has one

``data.kind`` is checked against the task's ``data_kinds`` (kinds are registered by their
readers, ``mammut.train.data.register_data_kind``), not against a fixed list.

Every key is checked: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the dotted key, what was expected and what was given, before anything is built.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.augment import AugmentConfig
from ..io import coerce as _coerce

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "LoopConfig",
    "EvalConfig",
    "RunConfig",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "list_presets",
    "resolve_config_path",
    "resolve_data_paths",
]


class ConfigError(ValueError):
    """A bad configuration key or value (the message names the dotted key)."""


@dataclass
class DataConfig:
    kind: str = "emoji"  # a data kind the task reads (Task.data_kinds): emoji | csv | webdataset | a registered one
    path: str | None = None  # csv/tsv file, or webdataset shard pattern ("data-{000..009}.tar")
    val_path: str | None = None  # held-out csv/tsv file or shard pattern (kind from the suffix); emoji: built in
    image_root: str | None = None  # csv: folder that relative image paths start from
    img_key: str = "filepath"  # csv column of image paths
    caption_key: str = "title"  # csv column of captions
    image_size: int = 64
    normalize: bool = False  # csv/webdataset: CLIP mean/std normalisation
    num_emoji: int | None = 300  # emoji: vocabulary size (null = every emoji)
    max_objects: int = 2  # emoji: 1..3 emoji per scene
    min_objects: int = 1
    vocab_seed: int = 0  # emoji: which emoji subset
    tokenizer: str | None = None  # tokenizer.json; null = train a byte-level BPE on the captions
    vocab_size: int = 2048  # BPE size when training one
    max_len: int = 32  # caption tokens, BOS and EOS included
    truncate: bool = True  # cut captions longer than max_len (EOS kept); false = skip such samples and count them
    num_workers: int = 0  # DataLoader worker processes
    shuffle_buffer: int = 1000  # webdataset sample shuffle buffer
    # training augmentations of csv data (crops, flips with left/right swapped in the caption, colour
    # jitter, random backgrounds behind transparency, a random caption per image): mammut.data.augment
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    warmup_epochs: float = 0.0  # > 0: the warm-up in passes over the data (replaces warmup_steps; csv data)
    weight_decay: float = 0.05  # not applied to norms, biases, embeddings, scales, queries
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class LoopConfig:
    steps: int = 1000  # optimiser steps (the budget is in steps, not seconds; but see time_budget_s)
    # > 0: train this many passes over the data instead (steps = ceil(epochs * samples / batch_size), decided
    # when the run starts and written to its config.yaml; data kinds that know their size: csv)
    epochs: float = 0.0
    # > 0: after 25 steps, keep as many of `steps` as this machine trains in this many seconds
    # (decided once, written to the run's config.yaml; 0 = all steps, whatever they take)
    time_budget_s: int = 0
    batch_size: int = 64  # global batch: over all ranks and accumulation micro-batches
    grad_accum: int = 1
    # auto | fp32 | bf16 (autocast; weights and optimiser stay fp32). auto: bf16 only where the device
    # runs it natively (mammut.precision), fp32 otherwise; the run's config.yaml records the choice
    precision: str = "auto"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward
    parallel: str = "auto"  # auto | none | ddp | fsdp (auto: ddp when launched by torchrun)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads per process (0 = leave as is)
    task: str = "pretrain"  # pretrain | vqa | interleaved | a plugin's (mammut.train.task); the model must support it
    init_from: str | None = None  # start from this run's (or save_pretrained folder's) weights, model and tokenizer
    # start the built-in ViT (model.vit and its img_encoder.* weights) from this run's newest valid
    # checkpoint or save_pretrained folder (the sources init_from takes); not with init_from
    image_encoder_from: str | None = None
    seed: int = 0
    dist_timeout: int = 600  # seconds a rank waits in a collective (init, all-reduce, barrier) before failing
    out_dir: str = "runs/run"
    log_every: int = 10  # steps between JSONL / TensorBoard records
    save_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps between quick held-out evaluations (0 = only at the end)
    # keep the weights of the best quick evaluation (train.eval_every) in RUN/best (model.safetensors and
    # best.json), besides the last checkpoint; best_metric: a key of the task's quick evaluation (higher is
    # better; pretraining: "R@1", the mean of image->text and text->image R@1)
    keep_best: bool = False
    best_metric: str = "R@1"
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar (rank 0)
    report: bool = True  # evaluate and write the report at the end


@dataclass
class EvalConfig:
    n: int = 512  # held-out scenes (the retrieval gallery)
    batch_size: int = 128
    templates: tuple[str, ...] = ("a {}", "a picture of a {}", "an emoji of a {}")  # zero-shot prompts
    max_new_tokens: int = 24  # greedy caption length
    grid: int = 16  # held-out scenes drawn in the report grid


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mammut"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task_options: Any = None  # an instance of the task's options dataclass (Task.options), else None

    def __post_init__(self) -> None:
        check_choice("train.precision", self.train.precision, ("auto", "fp32", "bf16"))
        check_choice("train.parallel", self.train.parallel, ("auto", "none", "ddp", "fsdp"))
        check_choice("train.device", self.train.device, ("auto", "cpu", "cuda"))
        positive = {
            "train.steps": self.train.steps, "train.batch_size": self.train.batch_size,
            "train.grad_accum": self.train.grad_accum, "train.log_every": self.train.log_every,
            "train.dist_timeout": self.train.dist_timeout,
            "data.image_size": self.data.image_size, "data.max_len": self.data.max_len,
            "eval.n": self.eval.n, "eval.batch_size": self.eval.batch_size, "optim.lr": self.optim.lr,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: expected a positive value, got {value}")
        for key, value in {"train.save_every": self.train.save_every, "train.eval_every": self.train.eval_every,
                           "optim.warmup_steps": self.optim.warmup_steps, "optim.grad_clip": self.optim.grad_clip,
                           "optim.weight_decay": self.optim.weight_decay, "data.num_workers": self.data.num_workers,
                           "train.threads": self.train.threads, "train.time_budget_s": self.train.time_budget_s}.items():
            if value < 0:
                raise ConfigError(f"{key}: expected a value >= 0, got {value}")
        for key, value in {"train.epochs": self.train.epochs, "optim.warmup_epochs": self.optim.warmup_epochs}.items():
            if value < 0 or value != value:
                raise ConfigError(f"{key}: expected a value >= 0, got {value}")
        if self.train.keep_best and not self.train.eval_every:
            raise ConfigError("train.keep_best: expected train.eval_every > 0 (the best is chosen among its "
                              "evaluations), got train.eval_every=0")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {self.optim.min_lr_ratio}")
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(
                f"train.batch_size: expected a multiple of train.grad_accum={self.train.grad_accum}, got {self.train.batch_size}"
            )
        if self.train.image_encoder_from and self.train.init_from:
            raise ConfigError(f"train.image_encoder_from: expected null with train.init_from (the init_from model "
                              f"already holds its image encoder), got {self.train.image_encoder_from!r}")
        if "name" not in self.model or not isinstance(self.model["name"], str):
            raise ConfigError(f"model.name: expected a registered model name (str), got {self.model.get('name')!r}")
        for t in self.eval.templates:
            if "{}" not in t:
                raise ConfigError(f"eval.templates: expected each template to contain '{{}}', got {t!r}")


SECTIONS: dict[str, type] = {"data": DataConfig, "optim": OptimConfig, "train": LoopConfig, "eval": EvalConfig}
TASK_OPTIONS = "task_options"  # the section of the task's own options (Task.options)


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")


# --------------------------------------------------------------------------- type checking
# one coercer for run configs and checkpoint configs: mammut.io.coerce (here with ConfigError,
# and command-line strings read as YAML)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting strings from the command line)
    and return it; raise :class:`ConfigError` naming ``key`` otherwise."""
    return _coerce.coerce(value, tp, key, error=ConfigError, parse_text=yaml.safe_load)


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` after checking every key and type."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r}: expected a dataclass")
    return coerce(values, cls, prefix)


def _unknown(key: str, name: str, valid: list[str]) -> ConfigError:
    return ConfigError(_coerce.unknown_key_message(key, name, valid))


def check_model_section(section: dict[str, Any]) -> dict[str, Any]:
    """Check ``model:`` against the registered model's config dataclass; returns the checked dict."""
    from ..models import get_model_spec, list_models

    name = section.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"model.name: expected a registered model name, got {name!r}")
    try:
        config_class = get_model_spec(name).config_class
    except ValueError:
        raise ConfigError(f"model.name: expected one of {list_models()}, got {name!r}") from None
    out: dict[str, Any] = {"name": name}
    if config_class is None or not dataclasses.is_dataclass(config_class):
        out.update({k: v for k, v in section.items() if k != "name"})
        return out
    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    for k, v in section.items():
        if k == "name":
            continue
        if k not in names:
            raise _unknown(f"model.{k}", str(k), names + ["name"])
        out[k] = coerce(v, hints[k], f"model.{k}")
        if k == "vit" and isinstance(out[k], dict):  # the built-in ViT's own fields
            from ..encoders import ViTConfig

            vit = build_dataclass(ViTConfig, out[k], "model.vit")
            out[k] = {name: getattr(vit, name) for name in out[k]}
    # the model's own value checks (choices, ranges), before any data or tokenizer work;
    # fields filled from the tokenizer later (num_tokens, ids) keep their defaults here
    try:
        config_class(**{k: v for k, v in out.items() if k != "name" and v is not None})
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("model.") else f"model.{msg}") from None
    return out


# --------------------------------------------------------------------------- loading


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--train.steps", "100", "--optim.lr=3e-4"]`` -> ``{"train.steps": "100", "optim.lr": "3e-4"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"override: expected '--section.key value', got {arg!r}")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{body}: override without a value")
            key, value = body, args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"{key}: expected a dotted key such as train.steps or model.dim")
        out[key] = value
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is not a section, cannot set {key}")
        node = node[part]
    # command-line strings are read as YAML scalars/lists; typed fields convert further
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        node[parts[-1]] = value


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Check a nested dict (as read from YAML) and build a :class:`RunConfig`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(tree).__name__}")
    valid = ["model", *SECTIONS, TASK_OPTIONS]
    sections: dict[str, Any] = {}
    for name, value in tree.items():
        if name not in valid:
            raise _unknown(str(name), str(name), valid)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        sections[name] = value
    name, task = sections.get("model", {}).get("name", "mammut"), sections.get("train", {}).get("task", "pretrain")
    if isinstance(name, str) and isinstance(task, str):  # an impossible pair first, before the model's own keys
        _check_model_task(name, task)
    model = check_model_section({"name": "mammut", **sections.get("model", {})})
    built = {name: build_dataclass(cls, sections.get(name, {}), name) for name, cls in SECTIONS.items()}
    options = task_options(built["train"].task, sections.get(TASK_OPTIONS))
    cfg = RunConfig(model=model, **built, task_options=options)
    check_task(cfg)
    return cfg


def task_options(task: str, values: dict[str, Any] | None) -> Any:
    """The ``task_options:`` section checked against the task's options dataclass
    (``Task.options``) by the config's typed coercion (errors name ``task_options.<key>``);
    None for a task without options, whose section must be absent or empty."""
    from .task import get_task

    cls = get_task(task).options
    if cls is None:
        if values:
            raise ConfigError(f"{TASK_OPTIONS}: expected no section (train.task={task!r} takes no options), "
                              f"got {values!r}")
        return None
    return build_dataclass(cls, values or {}, TASK_OPTIONS)


def _check_model_task(name: str, task: str) -> None:
    from ..models import get_model_spec, list_models
    from .task import list_tasks

    if task not in list_tasks():
        raise ConfigError(f"train.task: expected one of {list_tasks()}, got {task!r}")
    if name not in list_models():
        return  # check_model_section names the valid models
    spec = get_model_spec(name)
    if task not in spec.tasks:
        able = list_models(task)
        raise ConfigError(f"model.name: expected a model that trains on train.task={task!r} ({', '.join(able) or 'none'}), "
                          f"got {spec.name!r} (its tasks: {', '.join(spec.tasks) or 'none'})")


def check_task(cfg: RunConfig) -> None:
    """The model must train on ``train.task`` (its registry spec says so) and the task must
    read ``data.kind`` (its ``data_kinds``, each registered by its reader): an impossible
    combination is refused before any work."""
    from .task import get_task
    from .data import get_data_kind, list_data_kinds

    task = cfg.train.task
    _check_model_task(cfg.model["name"], task)
    kinds = list(get_task(task).data_kinds)
    if cfg.data.kind not in kinds:
        raise ConfigError(f"data.kind: expected one of {kinds} (the data kinds train.task={task!r} reads), "
                          f"got {cfg.data.kind!r}")
    try:
        kind = get_data_kind(cfg.data.kind)
    except ValueError:
        raise ConfigError(f"data.kind: expected a data kind with a registered reader ({list_data_kinds()}), got "
                          f"{cfg.data.kind!r} (listed by train.task={task!r})") from None
    if kind.needs_path and not cfg.data.path:
        raise ConfigError(f"data.path: expected a file or shard pattern for data.kind={cfg.data.kind!r}, got null")


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def list_presets() -> list[str]:
    """Names of the configs shipped in the package (``mammut train --config NAME``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(config: str | Path) -> Path:
    """A config file path, or the name of a packaged preset (``tiny``, ``demo``, ...)."""
    p = Path(config)
    if p.is_file():
        return p
    name = str(config)
    if p.suffix == "" and "/" not in name and "\\" not in name:
        preset = PRESET_DIR / f"{name}.yaml"
        if preset.is_file():
            return preset
        raise FileNotFoundError(f"config: expected a YAML file or one of the presets {list_presets()}, got {name!r}")
    raise FileNotFoundError(f"config: no such file {p} (presets: {', '.join(list_presets())})")


def load_config(path: str | Path | None, overrides: dict[str, str] | list[str] | None = None) -> RunConfig:
    """Read a YAML config (a file or a preset name; ``None`` starts from the defaults), apply
    dotted overrides and check everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            with p.open(encoding="utf-8") as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config: {p} is not valid YAML ({problem} at{where})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config: {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config: {p} must hold a mapping of sections, got {type(tree).__name__}")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree)
    train = cfg.train
    for key in ("init_from", "image_encoder_from"):  # absolute: the saved config.yaml works from anywhere
        value = getattr(train, key)
        if value and "://" not in value:
            train = dataclasses.replace(train, **{key: str(Path(value).expanduser().absolute())})
    return dataclasses.replace(cfg, data=resolve_data_paths(cfg.data, Path.cwd()), train=train)


DATA_PATH_KEYS: tuple[str, ...] = ("path", "val_path", "image_root", "tokenizer")


def resolve_data_paths(data: DataConfig, base: Path) -> DataConfig:
    """``data`` with its file paths made absolute against ``base`` (the working directory the
    config was loaded in), so a run's ``config.yaml`` works from any directory. URLs
    (``s3://``, ``pipe:``) and brace patterns are kept as written apart from the folder."""
    changes = {}
    for key in DATA_PATH_KEYS:
        value = getattr(data, key)
        if not value or "://" in value or value.startswith("pipe:"):
            continue
        p = Path(value).expanduser()
        changes[key] = str(p if p.is_absolute() else (base / p).absolute())
    return dataclasses.replace(data, **changes)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), for writing ``config.yaml``."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    tree = {"model": dict(cfg.model), **{name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}}
    if cfg.task_options is not None:
        tree[TASK_OPTIONS] = dataclasses.asdict(cfg.task_options)
    return plain(tree)

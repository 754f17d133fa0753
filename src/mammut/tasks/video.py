"""``video``: video-text pretraining (contrastive + captioning on clips), MaMMUT's video extension.

The model is the image model with :class:`~mammut.encoders.VideoTubeViT` as its image encoder,
declared in the run config (``model.encoder: {type: video_tube, vit: {...}, frames: 8, ...}``);
the objective is the model's own ``compute_losses`` on clips ``(b, t, 3, H, W)`` instead of
images, as for ``pretrain``. As in the paper, a video run usually starts from an image run
(``train.init_from RUN``): :meth:`VideoPretrain.init_model_section` keeps the source's
architecture and puts its ViT inside this run's video encoder (tubes, frames, ablations from
this run's ``model.encoder``), and :meth:`VideoPretrain.adapt_init_state` moves the source's
``img_encoder.*`` tensors to ``img_encoder.vit.*``; the tube projections, the gate (and any
learned tube positions) are new and start at their initialisation.

Data kinds (``data.kind``), each registered here; the clip length ``t`` is the encoder's
``model.encoder.frames``:

- ``moving_emoji`` (default): the embedded moving-emoji clips (:mod:`mammut.data.moving_emoji`),
  clip ``i`` a pure function of ``i`` (exact resume), held-out emoji pairs and motion
  combinations never trained on;
- ``video_csv``: ``data.path`` a CSV/TSV of ``filepath,title`` (``data.img_key`` /
  ``data.caption_key``), read through :class:`mammut.data.video_files.VideoCsv` in a seeded
  per-epoch order; unreadable files are skipped (the next row of the order takes their place),
  counted and named;
- ``video_webdataset``: ``data.path`` WebDataset shards with ``.mp4`` / ``.webm`` members, streamed
  through :func:`mammut.data.video_files.video_shard_samples` (shards split over ranks; a resumed
  run skips the samples already seen).

Frame sampling of video files: ``task_options: {sampling: uniform | stride, stride: N}``.

Evaluation on the held-out moving-emoji clips: retrieval both ways, captions, and the motion
checks of :mod:`mammut.tasks.video_eval` (retrieval among captions that differ only in motion,
for the clip and for its middle frame alone).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..models.contract import Batch
from .base import Task, register_task

__all__ = ["VideoPretrain", "VideoOptions", "clip_frames", "video_model_section", "video_init_state",
           "moving_emoji_dataset"]

log = logging.getLogger(__name__)

SAMPLINGS = ("uniform", "stride")


@dataclasses.dataclass
class VideoOptions:
    """The ``task_options:`` section of a video run (frame sampling of video files)."""

    sampling: str = "uniform"  # uniform: t frames spread over the clip | stride: t frames `stride` apart
    stride: int | None = None  # sampling: stride, frames between samples
    # moving_emoji: every other training clip is the one before it played backwards (same frames, the
    # opposite motion in its caption): hard negatives that only motion tells apart
    twins: bool = True

    def __post_init__(self) -> None:
        from ..train.config import ConfigError

        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"task_options.sampling: expected one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if self.sampling == "stride" and (self.stride is None or self.stride < 1):
            raise ConfigError(f"task_options.stride: expected an int >= 1 with sampling 'stride', got {self.stride!r}")


# ----------------------------------------------------------------------------- the model section


def clip_frames(cfg: Any) -> int:
    """Frames per clip: the run's ``model.encoder.frames`` (a ``video_tube`` encoder)."""
    from ..encoders import VideoTubeConfig
    from ..train.config import ConfigError

    encoder = cfg.model.get("encoder")
    if not isinstance(encoder, dict) or encoder.get("type") != "video_tube":
        raise ConfigError(f"model.encoder: train.task={cfg.train.task!r} needs a video encoder "
                          f"{{type: video_tube, vit: {{...}}, frames: N}}, got {encoder!r}")
    return int(encoder.get("frames", VideoTubeConfig.frames))


def video_model_section(cfg: Any, model: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """A video run's ``model:`` section from ``train.init_from``'s ``source``: a video source
    keeps its encoder (fine-tuning keys only, :func:`fine_tune_model_section`); an image source
    (``model.vit``) gives its architecture and its ViT, wrapped in this run's ``model.encoder``
    (tubes, frames, ablations)."""
    from ..train.config import ConfigError
    from ..train.task import fine_tune_model_section

    encoder = source.get("encoder")
    if isinstance(encoder, dict) and encoder.get("type") == "video_tube":
        return fine_tune_model_section(model, source)
    vit = source.get("vit")
    if not isinstance(vit, dict):
        raise ConfigError(f"train.init_from: a video run starts from an image model with a built-in ViT (model.vit) "
                          f"or a video model, got a {source.get('name')!r} model with model.vit={vit!r}")
    own = model.get("encoder")
    if not isinstance(own, dict) or own.get("type") != "video_tube":
        raise ConfigError(f"model.encoder: a video run from an image run needs this run's video encoder "
                          f"{{type: video_tube, frames: N, ...}} (the source's ViT goes inside), got {own!r}")
    out = fine_tune_model_section({k: v for k, v in model.items() if k != "encoder"}, source)
    out.pop("vit", None)
    given = own.get("vit") or {}
    differs = sorted(k for k in given if k != "image_size" and vit.get(k) != given[k])
    if differs:
        log.info("train.init_from: model.encoder.vit.%s taken from the source's model.vit", ", ".join(differs))
    out["encoder"] = {**own, "vit": dict(vit)}
    return out


def video_init_state(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """An image source's ``img_encoder.*`` tensors as ``img_encoder.vit.*`` of a video model; the
    video encoder's own parameters (tubes, gate, learned tube positions) are new."""
    from ..encoders import VideoTubeViT

    encoder = getattr(model, "img_encoder", None)
    if not isinstance(encoder, VideoTubeViT) or any(k.startswith("img_encoder.vit.") for k in state):
        return state, ()  # a video source: its tensors fit as they are
    out = {("img_encoder.vit." + k[len("img_encoder."):] if k.startswith("img_encoder.") else k): v
           for k, v in state.items()}
    own = {name.split(".")[0] for name, _ in encoder.named_parameters() if not name.startswith("vit.")}
    return out, tuple(sorted(f"img_encoder.{name}" for name in own))


# ----------------------------------------------------------------------------- data kinds


def moving_emoji_dataset(data_cfg: Any, frames: int, split: str = "train", seed: int = 0) -> Any:
    """The moving-emoji clips of a run's ``data:`` section (vocabulary as the emoji scenes')."""
    from ..data.moving_emoji import MovingEmoji

    return MovingEmoji(data_cfg.image_size, frames, data_cfg.num_emoji, split, seed, vocab_seed=data_cfg.vocab_seed)


def _moving_emoji_corpus(data_cfg: Any) -> list[str]:
    from ..data.moving_emoji import caption_texts
    from ..data.scenes import EmojiScenes

    names = EmojiScenes(data_cfg.image_size, data_cfg.num_emoji, 2, vocab_seed=data_cfg.vocab_seed).class_names()
    return caption_texts(names)


class _MovingEmojiSource:
    """Global sample ``i`` -> ``(clip (t, 3, H, W), caption)`` of the training split (seed 0,
    the data's own seed; ``train.seed`` orders nothing here: clip ``i`` is fixed); with
    ``twins``, :meth:`~mammut.data.moving_emoji.MovingEmoji.twin_clip` (time-reversed pairs)."""

    def __init__(self, data_cfg: Any, frames: int, twins: bool = True) -> None:
        self.ds = moving_emoji_dataset(data_cfg, frames)
        self.twins = twins

    def __call__(self, i: int) -> tuple[torch.Tensor, str]:
        clip = self.ds.twin_clip(i) if self.twins else self.ds.clip(i)
        return clip.frames, clip.caption


class _VideoCsvSource:
    """Global sample ``i`` -> a row of a ``VideoCsv`` in a per-epoch seeded order; an unreadable
    file gives way to the next row of the order (deterministic), and is counted and named once."""

    def __init__(self, data_cfg: Any, frames: int, seed: int, options: VideoOptions) -> None:
        from ..data.video_files import VideoCsv

        pre = _preprocess(data_cfg)
        self.ds = VideoCsv(data_cfg.path, frames=frames, image_size=data_cfg.image_size, sampling=options.sampling,
                           stride=options.stride, video_key=data_cfg.img_key, caption_key=data_cfg.caption_key,
                           video_root=data_cfg.image_root, preprocess=pre)
        if len(self.ds) == 0:
            raise ValueError(f"data.path: {data_cfg.path} has no rows with a caption")
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __call__(self, i: int) -> tuple[torch.Tensor, str]:
        n = len(self.ds)
        for step in range(n):
            epoch, j = divmod(i + step, n)
            if self._perm is None or self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = (epoch, torch.randperm(n, generator=g))
            item = self.ds[int(self._perm[1][j])]
            if item is not None:
                return item
        raise ValueError(f"data.path: no readable video in {self.ds.path} ({self.ds.skipped} unreadable)")


def _preprocess(data_cfg: Any) -> Any:
    """The frames' preprocessing: the eval transform of the run's images (CLIP mean/std with
    ``data.normalize``), so a video run sees frames as its image run saw images."""
    from ..data.datasets import CLIP_MEAN, CLIP_STD
    from ..preprocess import ImagePreprocess

    if not data_cfg.normalize:
        return None
    return ImagePreprocess(data_cfg.image_size, mean=CLIP_MEAN, std=CLIP_STD)


def _indexed(source: Any, data_cfg: Any, tokenizer: Any, *, batch_size: int, grad_accum: int, rank: int,
             world_size: int, start_step: int, steps: int) -> Iterator[list[Any]]:
    from ..data.datasets import ImageTextCollate
    from ..train.data import MicroBatches, indexed_batches

    collate = ImageTextCollate(tokenizer, data_cfg.max_len, truncate=True)
    ds = MicroBatches(source, collate, batch_size, grad_accum, rank, world_size)
    return indexed_batches(ds, data_cfg.num_workers, start_step, steps)


def _moving_emoji_reader(cfg: Any, tokenizer: Any, *, batch_size: int, grad_accum: int, seed: int, rank: int,
                         world_size: int, start_step: int, steps: int, frames: int = 8,
                         options: VideoOptions | None = None) -> Iterator[list[Any]]:
    """``data.kind: moving_emoji``: micro-batches ``(clips (m, t, 3, H, W), text (m, max_len))``."""
    twins = (options or VideoOptions()).twins
    return _indexed(_MovingEmojiSource(cfg, frames, twins), cfg, tokenizer, batch_size=batch_size, grad_accum=grad_accum,
                    rank=rank, world_size=world_size, start_step=start_step, steps=steps)


def _video_csv_reader(cfg: Any, tokenizer: Any, *, batch_size: int, grad_accum: int, seed: int, rank: int,
                      world_size: int, start_step: int, steps: int, frames: int = 8,
                      options: VideoOptions | None = None) -> Iterator[list[Any]]:
    """``data.kind: video_csv``: clips of the files a CSV lists, in a seeded per-epoch order."""
    source = _VideoCsvSource(cfg, frames, seed, options or VideoOptions())
    return _indexed(source, cfg, tokenizer, batch_size=batch_size, grad_accum=grad_accum, rank=rank,
                    world_size=world_size, start_step=start_step, steps=steps)


def _video_webdataset_reader(cfg: Any, tokenizer: Any, *, batch_size: int, grad_accum: int, seed: int, rank: int,
                             world_size: int, start_step: int, steps: int, frames: int = 8,
                             options: VideoOptions | None = None) -> Iterator[list[Any]]:
    """``data.kind: video_webdataset``: clips streamed from shards (rank ``r`` reads shards
    ``r, r + W, ...``, in order, epoch after epoch); a resumed run skips what it already read."""
    from ..data.datasets import ImageTextCollate
    from ..data.video_files import SkippedVideos, video_shard_samples
    from ..data.webdataset import expand_shards

    opts = options or VideoOptions()
    if batch_size % (world_size * grad_accum):
        raise ValueError(f"train.batch_size: expected a multiple of world_size * grad_accum = "
                         f"{world_size * grad_accum}, got {batch_size}")
    urls = expand_shards(cfg.path, "data.path")
    mine = urls[rank::world_size]
    if not mine:
        raise ValueError(f"data.path: {len(urls)} shard(s) for {world_size} ranks; expected at least one per rank")
    skips = SkippedVideos("video shards")

    def stream() -> Iterator[tuple[torch.Tensor, str]]:
        for epoch in itertools.count():
            n = 0
            for clip, caption, _key in video_shard_samples(mine, frames=frames, image_size=cfg.image_size,
                                                           sampling=opts.sampling, stride=opts.stride,
                                                           preprocess=_preprocess(cfg), skips=skips):
                n += 1
                yield clip, caption
            if n == 0:
                raise ValueError(f"data.path: rank {rank} read no usable clip from its {len(mine)} shard(s) of "
                                 f"{cfg.path} ({skips!r})")

    collate = ImageTextCollate(tokenizer, cfg.max_len, truncate=True)
    micro = batch_size // (world_size * grad_accum)

    def batches() -> Iterator[list[Any]]:
        it = itertools.islice(stream(), start_step * micro * grad_accum, None)
        for _ in range(start_step, steps):
            yield [collate(list(itertools.islice(it, micro))) for _ in range(grad_accum)]

    return batches()


def _check_csv(cfg: Any) -> None:
    from pathlib import Path

    p = Path(cfg.path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path: {'is a folder, expected a .csv or .tsv file' if p.is_dir() else 'no such file'}: {p}")


def _register_kinds() -> None:
    from ..train.data import expand_shards, register_data_kind

    register_data_kind("moving_emoji", _moving_emoji_reader, corpus=_moving_emoji_corpus)
    register_data_kind("video_csv", _video_csv_reader, needs_path=True, check=_check_csv,
                       corpus=lambda cfg: [c for _, c in _csv_rows(cfg)])
    register_data_kind("video_webdataset", _video_webdataset_reader, needs_path=True,
                       check=lambda cfg: expand_shards(cfg.path, "data.path") and None)


def _csv_rows(cfg: Any) -> list[tuple[Any, str]]:
    from ..data.video_files import VideoCsv

    ds = VideoCsv(cfg.path, frames=1, image_size=cfg.image_size, video_key=cfg.img_key, caption_key=cfg.caption_key,
                  video_root=cfg.image_root)
    return list(ds.samples)


_register_kinds()


# ----------------------------------------------------------------------------- the task


@register_task
class VideoPretrain(Task):
    """Contrastive + captioning on clips through a video encoder (MaMMUT's video fine-tuning)."""

    name = "video"
    data_kinds = ("moving_emoji", "video_csv", "video_webdataset")
    options = VideoOptions

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.frames = clip_frames(cfg)
        self._quick: Any = None

    @classmethod
    def init_model_section(cls, cfg: Any, model: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        return video_model_section(cfg, model, source)

    def adapt_init_state(self, state: dict[str, torch.Tensor],
                         model: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        return video_init_state(state, model)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        from .pretrain import trim_padding

        text = trim_padding(batch["text"], model.config.pad_id)
        out = model.compute_losses(text, batch["images"], token_share=batch.get("token_share"))
        return {"loss": out.total, "caption": out.caption, "contrastive": out.contrastive}

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Iterator[list[Batch]]:
        from ..train.data import get_data_kind

        t, data = self.cfg.train, self.cfg.data
        if not t.init_from and start_step == 0:
            log.info("video: training from scratch (pass --train.init_from RUN to start from an image run, as the paper)")
        reader = get_data_kind(data.kind).reader
        for micro in reader(data, tokenizer, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed, rank=rank,
                            world_size=world_size, start_step=start_step, steps=t.steps, frames=self.frames,
                            options=self.cfg.task_options):
            yield [{"images": clips, "text": text} for clips, text in micro]

    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        from .video_eval import evaluate_video_run

        return evaluate_video_run(self, model, tokenizer, data=data, n=n)

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float] | None:
        """Held-out retrieval (``R@1``, the mean both ways) and motion retrieval on 64 clips."""
        from .video_eval import quick_video_eval

        return quick_video_eval(self, model, tokenizer)

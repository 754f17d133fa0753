"""``videoqa``: open-answer VideoQA on moving-emoji clips, loss on the answer tokens only.

The ``vqa`` task's objective and prompts (:class:`mammut.data.vqa.VqaEncoder`,
:class:`mammut.tasks.vqa.VqaCollate`: ``BOS question "answer:" answer EOS``, labels on the answer
and EOS) with clips ``(b, t, 3, H, W)`` through a video encoder (``model.encoder: {type:
video_tube, ...}``), and its scoring (VQAv2 answer normalisation, accuracy per question type,
:mod:`mammut.eval.vqa`).

Questions (:class:`mammut.data.video_questions.VideoQuestions`): ``direction`` ("which way does
the cat move?" -> left / right / up / down: the motion questions), ``order`` ("does the cat move
first?" -> yes / no), ``event`` ("does the dog appear or disappear?") and ``exists`` ("is there a
cat?", the one type a single frame answers). ``task_options.types`` picks the types trained on.
Global sample ``i`` is question ``i`` of the training split seeded by ``train.seed``, split over
ranks and micro-batches as pretraining does, so a resumed run reads exactly what an
uninterrupted one would. A question too long for ``data.max_len`` is replaced deterministically.

Starting point: ``train.init_from`` a ``video`` run (its model and tokenizer as they are) or an
image run (its ViT wrapped in this run's ``model.encoder``, as the ``video`` task does).

Evaluation: the first ``eval.n`` questions about held-out clips (held-out emoji pairs and motion
combinations; a fixed seed), answered greedily, per type, against the same model given only
the clip's middle frame (repeated to ``t`` frames) and with the clip blanked (text only).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..models.contract import Batch
from .base import Task, register_task
from .vqa import VqaSource, greedy_answers

__all__ = ["VideoQa", "VideoQaOptions", "VideoQaSource"]

log = logging.getLogger(__name__)

_REPLACE_TRIES = 64
_QUICK_N = 64


@dataclasses.dataclass
class VideoQaOptions:
    """The ``task_options:`` section of a videoqa run."""

    types: tuple[str, ...] = ("direction", "order", "event", "exists")  # question types trained on, cycled
    # every other training question is the one before it about the clip played backwards (same frames,
    # the reversed answer), when the answer changes: hard negatives only motion tells apart
    twins: bool = True

    def __post_init__(self) -> None:
        from ..data.video_questions import QUESTION_TYPES
        from ..train.config import ConfigError

        self.types = tuple(self.types)
        bad = [t for t in self.types if t not in QUESTION_TYPES]
        if not self.types or bad:
            raise ConfigError(f"task_options.types: expected a non-empty subset of {list(QUESTION_TYPES)}, got {list(self.types)}")


class VideoQaSource(VqaSource):
    """Global sample index -> ``{"image": clip (t, 3, H, W), "prompt", "answer_ids", "question",
    "answer", "qtype"}`` (the keys :class:`~mammut.tasks.vqa.VqaCollate` reads)."""

    def __init__(self, data_cfg: Any, frames: int, split: str, seed: int, encoder: Any,
                 types: tuple[str, ...], twins: bool = False) -> None:
        from ..data.video_questions import VideoQuestions
        from .video import moving_emoji_dataset

        # the clips are the data's own (seed 0, as the video task's); ``seed`` orders the questions
        self.questions = VideoQuestions(moving_emoji_dataset(data_cfg, frames, split), seed, types)
        self.encoder, self.max_len, self.twins = encoder, data_cfg.max_len, twins
        self.replaced = 0

    task_name = "videoqa"

    def _question(self, i: int, attempt: int) -> Any:
        """Question ``i``; with ``twins``, questions come in pairs: ``2k`` is question ``k`` and
        ``2k + 1`` the same question about its clip played backwards when that changes the
        answer (else question ``k`` of another stream: same type and answer slot, another clip)."""
        from ..data.video_questions import VideoQuestion, answer_to

        if not self.twins:
            return self.questions.sample(i, attempt)
        q = self.questions.sample(i // 2, attempt)
        if i % 2 == 0:
            return q
        back = self.questions.clips.reverse(q.clip)
        answer = answer_to(back, q)
        if answer is not None and answer != q.answer:
            return VideoQuestion(back, q.question, answer, q.qtype, i)
        return self.questions.sample(i // 2, attempt + _REPLACE_TRIES)

    def _media(self, q: Any) -> torch.Tensor:
        return q.frames


@register_task
class VideoQa(Task):
    """Answer-only loss on moving-emoji questions; held-out VQA accuracy per type vs the middle frame."""

    name = "videoqa"
    data_kinds = ("moving_emoji",)
    options = VideoQaOptions

    def __init__(self, cfg: Any) -> None:
        from .video import clip_frames

        super().__init__(cfg)
        self.frames = clip_frames(cfg)
        self.opts = cfg.task_options if cfg.task_options is not None else VideoQaOptions()
        self.types = self.opts.types
        self._heldout: dict[int, list[dict[str, Any]]] = {}

    unused_parameters = True  # the contrastive heads get no gradient from the answer loss

    @classmethod
    def init_model_section(cls, cfg: Any, model: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        from .video import video_model_section

        return video_model_section(cfg, model, source)

    def adapt_init_state(self, state: dict[str, torch.Tensor],
                         model: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        from .video import video_init_state

        return video_init_state(state, model)

    def tokenizer_corpus(self) -> list[str]:
        from ..data.video_questions import video_question_texts
        from .video import _moving_emoji_corpus
        from ..data.scenes import EmojiScenes

        d = self.cfg.data
        names = EmojiScenes(d.image_size, d.num_emoji, 2, vocab_seed=d.vocab_seed).class_names()
        return video_question_texts(names) + _moving_emoji_corpus(d)

    def _encoder(self, tokenizer: Any) -> Any:
        from ..data.vqa import VqaEncoder

        return VqaEncoder(tokenizer)

    # ---------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        loss = model.caption_loss(batch["text"], batch["images"], labels=batch["labels"],
                                  token_share=batch.get("token_share"))
        return {"loss": loss}

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Any:
        from ..train.data import MicroBatches, indexed_batches
        from .vqa import VqaCollate

        t = self.cfg.train
        if not t.init_from and start_step == 0:
            log.info("videoqa: training from scratch (pass --train.init_from RUN to fine-tune a video or image run)")
        source = VideoQaSource(self.cfg.data, self.frames, "train", t.seed, self._encoder(tokenizer), self.types,
                               twins=self.opts.twins)
        ds = MicroBatches(source, VqaCollate(tokenizer.pad_id, False), t.batch_size, t.grad_accum,  # type: ignore[arg-type]
                          rank, world_size)
        return indexed_batches(ds, self.cfg.data.num_workers, start_step, t.steps)

    # ---------------------------------------------------------------- evaluation
    def heldout(self, tokenizer: Any, n: int) -> list[dict[str, Any]]:
        """The first ``n`` held-out questions (all types, a fixed seed), cached per size."""
        from ..data.moving_emoji import HELDOUT_SEED
        from ..data.video_questions import QUESTION_TYPES

        if n not in self._heldout:
            source = VideoQaSource(self.cfg.data, self.frames, "heldout", HELDOUT_SEED, self._encoder(tokenizer),
                                   QUESTION_TYPES)
            self._heldout[n] = [source(i) for i in range(n)]
        return self._heldout[n]

    def answer(self, model: nn.Module, tokenizer: Any, clips: torch.Tensor, prompts: list[list[int]]) -> list[str]:
        """Greedy answers to ``prompts`` about ``clips`` ``(b, t, 3, H, W)``."""
        return greedy_answers(model, tokenizer, clips, prompts, self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens)

    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        """Held-out accuracy per type against the middle frame alone and the text-only model."""
        from ..eval.report import RunReport, scenes_figure
        from ..eval.vqa import accuracy_by_type, vqa_table
        from .video_eval import frame_strips, middle_frame

        if data is not None:
            raise ValueError(f"--data: the videoqa task is scored on questions about held-out moving-emoji clips and "
                             f"reads no other data, got {data!r} (MSRVTT-QA / MSVD-QA files: mammut eval's benchmarks)")
        n = self.cfg.eval.n if n is None else n
        items = self.heldout(tokenizer, n)
        clips = torch.stack([it["image"] for it in items])
        prompts = [it["prompt"] for it in items]
        refs, types = [it["answer"] for it in items], [it["qtype"] for it in items]
        answers = self.answer(model, tokenizer, clips, prompts)
        single = self.answer(model, tokenizer, middle_frame(clips), prompts)
        blind = self.answer(model, tokenizer, torch.zeros_like(clips), prompts)
        result = accuracy_by_type(answers, refs, types, baseline=single)
        text_only = accuracy_by_type(blind, refs, types)
        result.update({
            "baseline": "single frame: the same model given only the middle frame, repeated to t frames",
            "text_only_accuracy": text_only["accuracy"],
            "text_only_per_type": {t: r["accuracy"] for t, r in text_only["per_type"].items()},
            "scoring": "VQAv2 answer normalisation; one reference per question: exact match after normalisation",
            "init_from": self.cfg.train.init_from,
        })
        split = {"name": "heldout", "held_out": True,
                 "source": f"{n} questions about held-out moving-emoji clips (emoji pairs and motion combinations "
                           f"never trained on)"}
        section = (f"## VideoQA accuracy on {n} held-out questions\n\n"
                   + vqa_table(result, baseline="middle frame only")
                   + f"\nText-only (clip blanked): {text_only['accuracy']:.3f}. Middle frame only: the same model given "
                     f"frame t//2 repeated t times. Answers normalised as VQAv2 (mammut.eval.vqa).\n")
        report = RunReport(sections=[section.rstrip()], figures=scenes_figure(
            frame_strips(clips), [f"{it['question']} -> {a}" for it, a in zip(items, answers)],
            [f"{it['question']} -> {it['answer']}" for it in items], grid=self.cfg.eval.grid))
        log.info("videoqa: held-out accuracy %.3f (middle frame %.3f, text-only %.3f) on %d questions",
                 result["accuracy"], result["baseline_accuracy"], text_only["accuracy"], n)
        return {"eval_split": split, "vqa": result}, report

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        from ..eval.vqa import vqa_accuracy

        items = self.heldout(tokenizer, min(_QUICK_N, self.cfg.eval.n))
        answers = self.answer(model, tokenizer, torch.stack([it["image"] for it in items]), [it["prompt"] for it in items])
        return {"vqa_acc": sum(vqa_accuracy(a, it["answer"]) for a, it in zip(answers, items)) / len(items)}

"""``vqa``: prompted captioning / VQA fine-tuning on emoji-scene questions, loss on answer tokens only.

Models: every decoder whose registry spec lists ``vqa`` (MaMMUT, CoCa, FlamingoPaLM), from
scratch or from another run's weights (``train.init_from RUN``). The questions and their
balance: :mod:`mammut.data.vqa`; the scoring: :mod:`mammut.eval.vqa`.

One sequence (``n`` tokens, ``n <= data.max_len``, right-padded to the batch's longest)::

    text    BOS [<image>] question... "answer:" answer... EOS   PAD...
    labels  -100 ...                   answer... EOS  -100  -100...

position ``i`` predicts ``labels[:, i]`` (``ModelBase.caption_loss``), so the prompt (BOS, the
media token, the question and ``"answer:"``) is context only and the loss is the token mean
over the answer and its EOS. A media model (``"media_sequence"`` in ``ModelSpec.inputs``,
FlamingoPaLM) gets its one image as ``(b, 1, c, h, w)`` and the media token ``<image>`` right
after BOS; the others get ``(b, c, h, w)`` and no media token. The prompts:
:class:`mammut.data.vqa.VqaEncoder`.

Batches: ``{"images": (b, 3, H, W) | (b, 1, 3, H, W), "text": (b, n), "labels": (b, n)}``.
Global sample ``i`` is question ``i`` of the training split seeded by ``train.seed`` (a pure
function of both), split over ranks and ``train.grad_accum`` as pretraining does
(``mammut.train.data.MicroBatches``), so a resumed run reads exactly what an uninterrupted one
would. A question whose prompt and answer do not fit ``data.max_len`` is replaced by a
deterministic other (never truncated: that would cut the answer).

Evaluation: the first ``eval.n`` questions about the held-out emoji scenes (emoji pairs never
seen in training; a fixed seed, so every run answers the same questions), answered greedily
from the prompt, scored with the VQAv2 rules per question type, against the same model with
every image blanked (all zeros) as the text-only baseline.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..constants import IGNORE_INDEX, MEDIA_TOKEN
from ..data.vqa import VqaEncoder
from ..models.contract import Batch
from .base import Task, register_task

__all__ = ["Vqa", "VqaEncoder", "VqaSource", "VqaCollate", "HELDOUT_SEED", "greedy_answers"]  # VqaEncoder: mammut.data.vqa's

log = logging.getLogger(__name__)

HELDOUT_SEED = 0  # the held-out questions' seed: the same questions for every run
_REPLACE_TRIES = 64  # replacements tried for a question longer than data.max_len
_QUICK_N = 64  # held-out questions in quick_eval


class VqaSource:
    """Global sample index -> ``{"image" (3, H, W), "prompt", "answer_ids", "question", "answer",
    "qtype"}``: question ``i`` of ``split``, replaced deterministically when it does not fit ``max_len``."""

    def __init__(self, data_cfg: Any, split: str, seed: int, encoder: VqaEncoder) -> None:
        from ..data.vqa import EmojiQuestions
        from ..data.sources import emoji_dataset

        self.questions = EmojiQuestions(emoji_dataset(data_cfg, split), seed)
        self.encoder, self.max_len = encoder, data_cfg.max_len
        self.replaced = 0  # questions replaced because they were too long (in this process)

    task_name = "vqa"  # in the log line of a replaced question

    def _question(self, i: int, attempt: int) -> Any:
        """Draw ``attempt`` of question ``i`` (``.question``, ``.answer``, ``.qtype``, and its media)."""
        return self.questions.sample(i, attempt)

    def _media(self, q: Any) -> torch.Tensor:
        """What the model sees of question ``q``: its image ``(3, H, W)``."""
        return q.image

    def __call__(self, i: int) -> dict[str, Any]:
        first = ""
        for attempt in range(_REPLACE_TRIES):
            q = self._question(i, attempt)
            prompt, answer = self.encoder.prompt(q.question), self.encoder.answer(q.answer)
            if len(prompt) + len(answer) <= self.max_len:
                if attempt:
                    self.replaced += 1
                    log.log(logging.WARNING if self.replaced <= 20 else logging.DEBUG,
                            "%s %s question %d: longer than data.max_len=%d tokens, replaced (attempt %d); "
                            "%d replaced so far", self.task_name, self.questions.split, i, self.max_len, attempt,
                            self.replaced)
                return {"image": self._media(q), "prompt": prompt, "answer_ids": answer, "question": q.question,
                        "answer": q.answer, "qtype": q.qtype}
            if attempt == 0:
                first = f"{q.question} {q.answer} ({len(prompt) + len(answer)} tokens)"
        raise ValueError(f"data.max_len: expected room for a question and its answer, got {self.max_len} tokens; "
                         f"{_REPLACE_TRIES} questions in a row are longer (e.g. {first!r}); raise data.max_len")


class VqaCollate:
    """Items of :class:`VqaSource` -> a batch ``{"images", "text", "labels"}`` (see the module docstring)."""

    def __init__(self, pad_id: int, media: bool) -> None:
        self.pad_id, self.media = pad_id, media

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        if not items:
            raise ValueError("batch is empty")
        width = max(len(it["prompt"]) + len(it["answer_ids"]) for it in items)
        text = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, it in enumerate(items):
            p, a = it["prompt"], it["answer_ids"]
            text[row, : len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
            labels[row, len(p) - 1: len(p) - 1 + len(a)] = torch.tensor(a, dtype=torch.long)
        images = torch.stack([it["image"] for it in items])
        return {"images": images.unsqueeze(1) if self.media else images, "text": text, "labels": labels}


@register_task
class Vqa(Task):
    """Loss on the answer tokens of balanced emoji-scene questions; held-out VQA accuracy per type."""

    name = "vqa"
    data_kinds = ("emoji",)

    def __init__(self, cfg: Any) -> None:
        from ..models import get_model_spec
        from ..train.config import ConfigError

        super().__init__(cfg)
        self.media = "media_sequence" in get_model_spec(cfg.model["name"]).inputs
        if cfg.data.max_objects < 2:
            raise ConfigError(f"data.max_objects: the vqa task asks about emoji pairs, expected >= 2, got {cfg.data.max_objects}")
        self._heldout: dict[int, list[dict[str, Any]]] = {}
        self._model_checked = False
        self._media_id: int | None = None

    # ---------------------------------------------------------------- tokenizer
    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Special tokens the run's tokenizer must hold: ``<image>`` for a media model (read on
        the instance: it depends on ``model.name``)."""
        return (MEDIA_TOKEN,) if self.media else ()

    def tokenizer_corpus(self) -> list[str]:
        """The questions and answers, so a BPE trained for this run has their words."""
        from ..data.vqa import question_texts
        from ..data.sources import emoji_dataset

        return question_texts(emoji_dataset(self.cfg.data).class_names())

    @property
    def unused_parameters(self) -> bool:
        """A contrastive captioner's contrastive heads get no gradient from the answer loss."""
        return not self.media

    def _encoder(self, tokenizer: Any) -> VqaEncoder:
        from ..train.config import ConfigError

        media_id = None
        if self.media:
            media_id = tokenizer.special_id(MEDIA_TOKEN)  # one id, never split (not an ordinary BPE piece)
            if media_id is None:
                raise ConfigError(f"data.tokenizer: model.name={self.cfg.model['name']!r} with train.task='vqa' needs the "
                                  f"special token {MEDIA_TOKEN!r} in the tokenizer, got a tokenizer without it; leave "
                                  f"data.tokenizer null or train one with train_bpe(..., extra_special=({MEDIA_TOKEN!r},))")
            configured = self.cfg.model.get("media_token_id")
            if configured is not None and configured != media_id:
                raise ConfigError(f"model.media_token_id: expected the tokenizer's {MEDIA_TOKEN!r} id {media_id}, got {configured}")
        self._media_id = media_id
        return VqaEncoder(tokenizer, media_id)

    # ---------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        if self._media_id is not None and not self._model_checked:  # once: the model marks images with <image>
            if model.config.media_token_id != self._media_id:
                from ..train.config import ConfigError

                raise ConfigError(f"model.media_token_id: expected the tokenizer's <image> id {self._media_id}, "
                                  f"got {model.config.media_token_id}")
            self._model_checked = True
        loss = model.caption_loss(batch["text"], batch["images"], labels=batch["labels"],
                                  token_share=batch.get("token_share"))
        return {"loss": loss}

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Any:
        from ..train.data import MicroBatches, indexed_batches

        t = self.cfg.train
        if not t.init_from and start_step == 0:
            log.info("vqa: training from scratch (pass --train.init_from RUN to fine-tune a pretraining run)")
        source = VqaSource(self.cfg.data, "train", t.seed, self._encoder(tokenizer))
        ds = MicroBatches(source, VqaCollate(tokenizer.pad_id, self.media), t.batch_size, t.grad_accum,  # type: ignore[arg-type]
                          rank, world_size)
        return indexed_batches(ds, self.cfg.data.num_workers, start_step, t.steps)

    # ---------------------------------------------------------------- evaluation
    def heldout(self, tokenizer: Any, n: int) -> list[dict[str, Any]]:
        """The first ``n`` held-out questions (encoded), cached per size."""
        if n not in self._heldout:
            source = VqaSource(self.cfg.data, "heldout", HELDOUT_SEED, self._encoder(tokenizer))
            self._heldout[n] = [source(i) for i in range(n)]
        return self._heldout[n]

    def answer(self, model: nn.Module, tokenizer: Any, images: torch.Tensor, prompts: list[list[int]]) -> list[str]:
        """Greedy answers (decoded strings) to ``prompts`` about ``images`` ``(b, 3, H, W)``."""
        return greedy_answers(model, tokenizer, images.unsqueeze(1) if self.media else images, prompts,
                              self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens)

    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        """Held-out accuracy per question type against the text-only baseline; the report: its
        table and a grid of questions with the model's and the true answers."""
        from ..eval.report import RunReport, scenes_figure
        from ..eval.vqa import accuracy_by_type, vqa_table

        if data is not None:
            raise ValueError(f"--data: the vqa task is scored on questions about the held-out emoji scenes and reads no "
                             f"other data, got {data!r}")
        n = self.cfg.eval.n if n is None else n
        items = self.heldout(tokenizer, n)
        images = torch.stack([it["image"] for it in items])
        prompts = [it["prompt"] for it in items]
        answers = self.answer(model, tokenizer, images, prompts)
        blind = self.answer(model, tokenizer, torch.zeros_like(images), prompts)
        result = accuracy_by_type(answers, [it["answer"] for it in items], [it["qtype"] for it in items], baseline=blind)
        result.update({
            "baseline": "text-only: the same model with every image blanked (all zeros)",
            "scoring": "VQAv2 answer normalisation, then min(#matching references / min(3, #references), 1); "
                       "one reference per question here: exact match after normalisation",
            "init_from": self.cfg.train.init_from,
        })
        split = {"name": "heldout", "held_out": True,
                 "source": f"{n} questions about emoji scenes of the held-out split (emoji pairs never seen in training)"}
        section = (f"## VQA accuracy on {n} held-out questions\n\n" + vqa_table(result) +
                   "\nText-only: the same model answering with every image blanked (all zeros). Most common answer: "
                   "always giving the type's most frequent answer. Answers normalised as VQAv2 (mammut.eval.vqa).\n")
        report = RunReport(sections=[section.rstrip()], figures=scenes_figure(
            images, [f"{it['question']} -> {a}" for it, a in zip(items, answers)],
            [f"{it['question']} -> {it['answer']}" for it in items], grid=self.cfg.eval.grid))
        log.info("vqa: held-out accuracy %.3f (text-only %.3f) on %d questions",
                 result["accuracy"], result["baseline_accuracy"], n)
        return {"eval_split": split, "vqa": result}, report

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        from ..eval.vqa import vqa_accuracy

        items = self.heldout(tokenizer, min(_QUICK_N, self.cfg.eval.n))
        answers = self.answer(model, tokenizer, torch.stack([it["image"] for it in items]), [it["prompt"] for it in items])
        return {"vqa_acc": sum(vqa_accuracy(a, it["answer"]) for a, it in zip(answers, items)) / len(items)}


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Any, media: torch.Tensor, prompts: list[list[int]],
                   batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy continuations of ``prompts`` about ``media`` (images ``(b, 3, H, W)``,
    clips or media sequences ``(b, t, 3, H, W)``), decoded, in chunks of ``batch_size``; the
    model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            ids = model.generate(media[s:s + batch_size].to(dev), prompt=prompts[s:s + batch_size],
                                 max_new_tokens=max_new_tokens, strategy="greedy")
            out += tokenizer.decode(ids.cpu())
    finally:
        model.train(was_training)
    return out

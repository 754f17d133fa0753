"""``interleaved``: Flamingo-style interleaved image-text sequences (FlamingoPaLM).

Legend: ``b`` sequences, ``t`` scenes (media) per sequence, ``T`` = ``model.num_time_embeds``
(the most scenes per sequence), ``n`` tokens, ``H``/``W`` pixels.

Data (:mod:`mammut.data.interleaved`): sequence ``i`` is ``t`` emoji scenes (``t`` uniform in
``1..T``, a pure function of ``(train.seed, i)``) as
``[BOS] <image> caption 1 <image> caption 2 ... <image> caption t [EOS]``, at most
``data.max_len`` tokens (trailing scenes dropped to fit). Micro-batches are dicts
``{"images": (b, t_max, 3, H, W), "text": (b, n), "labels": (b, n)}`` (zero images pad the
rows with fewer scenes; FlamingoPaLM never reads them, so no ``time_mask``), split over ranks
and ``train.grad_accum`` exactly as the ``pretrain`` task splits scenes; resuming at step
``s`` reads what an uninterrupted run reads.

Objective: ``model.caption_loss(text, images, labels=labels, token_share=...)``, the next-token
loss on caption tokens and EOS only (``labels`` is ``-100`` at media tokens and padding, and
the model masks media targets too); ``labels`` make the task's token shares count exactly
those targets, so accumulation and ranks give the token mean of the whole step.

The paper's recipe: ``model.freeze_lm: true`` (the ``flamingo`` preset) trains only the
perceiver resampler and the gated cross-attention blocks; the LM (embeddings, blocks, final
norm, tied logits) and the image encoder stay as they are. From scratch the frozen LM is a
random one; for a trained LM start from a run with ``train.init_from`` (e.g. a run of this
task with ``model.freeze_lm: false``): the architecture and tokenizer come from that run and
``freeze_lm`` from this config. The frozen image encoder should be a trained one too:
``train.image_encoder_from RUN`` takes the ViT of a pretraining run (e.g. ``--config tiny``).

Evaluation (``mammut eval RUN``): held-out sequences of ``2..T`` scenes from the emoji held-out
split; the model captions the LAST image greedily, once with the earlier images and their true
captions as the prompt (``[BOS] <image> c_1 ... <image> c_{t-1} <image>``) and once from the
last image alone (``[BOS] <image>``), both scored by BLEU-4, CIDEr-D and the emoji-name
accuracy (``mammut.eval.metrics``): does context help?

Sequence kinds: ``data.kind`` picks what the sequences are, through :func:`register_sequence_kind`
(a :class:`SequenceKind`: the training source and, optionally, its own evaluation). ``emoji``
(above) is registered here; ``naming_game`` (:mod:`mammut.tasks.naming_game`: sequences whose
last caption needs the earlier pairs, scored at 0..4 shots) is registered by its module, imported
at the end of this one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..constants import MEDIA_TOKEN
from ..data.interleaved import InterleavedCollate, InterleavedSample, InterleavedSource, build_prompt, caption_ids
from ..models.contract import Batch
from .base import Task, register_task

log = logging.getLogger(__name__)

__all__ = ["Interleaved", "media_token_id", "SequenceKind", "register_sequence_kind", "get_sequence_kind"]

QUICK_N = 64  # held-out sequences scored every train.eval_every steps


def media_token_id(tokenizer: Any) -> int:
    """The tokenizer's ``<image>`` special token id; a ``ValueError`` naming the config key without one."""
    idx = tokenizer.special_id(MEDIA_TOKEN)
    if idx is None:
        raise ValueError(f"data.tokenizer: train.task='interleaved' expected a tokenizer with the special token "
                         f"{MEDIA_TOKEN!r} (FlamingoPaLM's media_token_id), got one without it; train one with "
                         f"train_bpe(..., extra_special=({MEDIA_TOKEN!r},)) or leave data.tokenizer null")
    return idx


@dataclasses.dataclass(frozen=True)
class SequenceKind:
    """What the ``interleaved`` task reads for one ``data.kind``: ``train_source(cfg, T)``, the
    training sequences (global index -> ``InterleavedSample``); ``evaluate(task, model,
    tokenizer, n)`` and ``quick_eval(task, model, tokenizer)``, its own held-out evaluation
    (None: the last-image captions of held-out emoji sequences, :meth:`Interleaved.evaluate`)."""

    name: str
    train_source: Callable[[Any, int], Callable[[int], InterleavedSample]]
    evaluate: Callable[..., tuple[dict[str, Any], Any]] | None = None
    quick_eval: Callable[..., dict[str, float] | None] | None = None


_SEQUENCE_KINDS: dict[str, SequenceKind] = {}


def register_sequence_kind(kind: SequenceKind) -> SequenceKind:
    """Register the sequences of ``data.kind: kind.name`` (list the name in
    :attr:`Interleaved.data_kinds` and register the data kind, ``register_data_kind``)."""
    held = _SEQUENCE_KINDS.get(kind.name)
    if held is not None and held != kind:
        raise ValueError(f"sequence kind {kind.name!r} is already registered")
    _SEQUENCE_KINDS[kind.name] = kind
    return kind


def get_sequence_kind(name: str) -> SequenceKind:
    if name not in _SEQUENCE_KINDS:
        raise ValueError(f"data.kind: train.task='interleaved' expected one of {sorted(_SEQUENCE_KINDS)}, got {name!r}")
    return _SEQUENCE_KINDS[name]


def _emoji_sequences(cfg: Any, max_media: int) -> Callable[[int], InterleavedSample]:
    from ..data.sources import emoji_dataset

    return InterleavedSource(emoji_dataset(cfg.data, "train"), max_media, cfg.train.seed)


register_sequence_kind(SequenceKind("emoji", _emoji_sequences))


@register_task
class Interleaved(Task):
    name = "interleaved"
    data_kinds = ("emoji", "naming_game")
    special_tokens = (MEDIA_TOKEN,)  # build_tokenizer adds these to a BPE it trains

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if cfg.model.get("freeze_lm") and not cfg.train.init_from:
            log.warning("model.freeze_lm: true without train.init_from freezes a randomly initialised language model "
                        "(its frozen final norm and tied embeddings cap the logits near zero, so the loss stays near "
                        "log(vocabulary)); the paper freezes a trained LM: start from a run with train.init_from")
        if not cfg.train.init_from and not cfg.train.image_encoder_from:
            log.warning("the image encoder is always frozen: without train.image_encoder_from (or train.init_from) it "
                        "stays at its random initialisation and the image pathway learns little; start it from a "
                        "pretraining run's ViT with train.image_encoder_from RUN")
        self._media_id: int | None = None
        self._checked_model = False
        self._heldout: dict[int, tuple[list[InterleavedSample], int]] = {}

    @property
    def max_media(self) -> int:
        """``T``: the model's ``num_time_embeds`` (its config default when the run leaves it out)."""
        from ..models import get_model_class

        value = self.cfg.model.get("num_time_embeds")
        if value is None:
            fields = {f.name: f.default for f in dataclasses.fields(get_model_class(self.cfg.model["name"]).config_class)}
            value = fields["num_time_embeds"]
        return int(value)

    def _collate(self, tokenizer: Any) -> InterleavedCollate:
        self._media_id = media_token_id(tokenizer)
        return InterleavedCollate(tokenizer, self._media_id, self.cfg.data.max_len, truncate=self.cfg.data.truncate)

    def _check_model(self, model: nn.Module) -> None:
        if self._checked_model or self._media_id is None:
            return
        got = model.config.media_token_id
        if got != self._media_id:
            raise ValueError(f"model.media_token_id: expected the tokenizer's {MEDIA_TOKEN!r} id {self._media_id}, got {got}")
        self._checked_model = True

    # ---------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        self._check_model(model)
        loss = model.caption_loss(batch["text"], batch["images"], labels=batch["labels"],
                                  token_share=batch.get("token_share"))
        return {"loss": loss}

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Iterator[list[Batch]]:
        """Steps ``start_step .. train.steps - 1``, each this rank's ``grad_accum`` micro-batches;
        the tokenizer and data are checked here, before the first step is asked for."""
        from ..train.data import MicroBatches

        t = self.cfg.train
        source = get_sequence_kind(self.cfg.data.kind).train_source(self.cfg, self.max_media)
        ds = MicroBatches(source, self._collate(tokenizer), t.batch_size, t.grad_accum, rank, world_size)  # type: ignore[arg-type]
        return self._steps(ds, start_step)

    def _steps(self, ds: Any, start_step: int) -> Iterator[list[Batch]]:
        from torch.utils.data import DataLoader

        t, workers = self.cfg.train, self.cfg.data.num_workers
        ks = range(start_step * t.grad_accum, t.steps * t.grad_accum)
        if workers > 0:
            it: Any = iter(DataLoader(ds, batch_size=None, sampler=ks, num_workers=workers, prefetch_factor=4))
        else:
            it = (ds[k] for k in ks)
        for _ in range(start_step, t.steps):
            yield [next(it) for _ in range(t.grad_accum)]

    # ---------------------------------------------------------------- evaluation
    def heldout_sequences(self, tokenizer: Any, n: int) -> tuple[list[InterleavedSample], int]:
        """The first ``n`` held-out sequences that keep at least 2 scenes within ``data.max_len``
        (cut to what fits, as in training), and how many were passed over for keeping fewer."""
        if n not in self._heldout:
            from ..data.sources import DATA_SEED, emoji_dataset

            collate = self._collate(tokenizer)
            source = InterleavedSource(emoji_dataset(self.cfg.data, "heldout"), self.max_media, DATA_SEED,
                                       min_media=min(2, self.max_media))
            out, skipped, i = [], 0, 0
            while len(out) < n:
                sample = source(i)
                i += 1
                _, kept = collate.fit(sample)
                if kept < 2 <= self.max_media:
                    skipped += 1
                    if skipped > 10 * n + 100:
                        raise ValueError(f"data.max_len: only {len(out)} held-out sequences keep 2 scenes within "
                                         f"{self.cfg.data.max_len} tokens, asked for {n}; raise data.max_len")
                    continue
                out.append(dataclasses.replace(sample, images=sample.images[:kept], captions=sample.captions[:kept],
                                               names=sample.names[:kept], scene_indices=sample.scene_indices[:kept]))
            self._heldout[n] = (out, skipped)
        return self._heldout[n]

    @torch.no_grad()
    def last_captions(self, model: nn.Module, tokenizer: Any, samples: list[InterleavedSample], *,
                      context: bool) -> list[str]:
        """Greedy captions of each sequence's last image, with the earlier images and true
        captions as the prompt (``context``) or from the last image alone."""
        if self._media_id is None:
            self._media_id = media_token_id(tokenizer)
        self._check_model(model)
        eval_cfg, dev = self.cfg.eval, next(model.parameters()).device
        out: list[str | None] = [None] * len(samples)
        groups: dict[int, list[int]] = {}
        for j, s in enumerate(samples):  # equal scene counts share a batch: no padded media
            groups.setdefault(s.num_media if context else 1, []).append(j)
        was_training = model.training
        model.eval()
        for _, rows in sorted(groups.items()):
            for start in range(0, len(rows), eval_cfg.batch_size):
                chunk = rows[start:start + eval_cfg.batch_size]
                prompts, images = [], []
                for j in chunk:
                    s = samples[j]
                    earlier = caption_ids(tokenizer, s.captions[:-1]) if context else []
                    prompts.append(build_prompt(earlier, media_id=self._media_id, bos_id=tokenizer.bos_id))
                    images.append(s.images if context else s.images[-1:])
                ids = model.generate(torch.stack(images).to(dev), prompt=prompts, max_new_tokens=eval_cfg.max_new_tokens)
                for j, text in zip(chunk, tokenizer.decode(ids.cpu())):
                    out[j] = text
        model.train(was_training)
        return [t or "" for t in out]

    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        """Last-image captions of ``n`` (default ``eval.n``) held-out sequences, with and without
        the earlier scenes: ``(metrics, mammut.eval.report.RunReport)``; ``metrics["caption"]``
        holds the with-context scores (the report's caption table), ``metrics["last_image"]`` both
        and their gain. The report: the last-image section, then the image-text report's parts
        (the caption table, ``scenes.png`` of the last images with their with-context captions,
        ``retrieval.md``)."""
        if data is not None:
            raise ValueError(f"--data: train.task='interleaved' evaluates on its built-in held-out emoji sequences, "
                             f"expected no data file, got {data!r}")
        kind = get_sequence_kind(self.cfg.data.kind)
        if kind.evaluate is not None:
            return kind.evaluate(self, model, tokenizer, n=n)
        from ..data.sources import emoji_dataset
        from ..eval.report import RunReport, image_text_report

        n = self.cfg.eval.n if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"eval.n: expected an int >= 1 (held-out sequences), got {n!r}")
        samples, skipped = self.heldout_sequences(tokenizer, n)
        class_names = emoji_dataset(self.cfg.data).class_names()
        truth = [s.captions[-1] for s in samples]
        names = [list(s.names[-1]) for s in samples]
        generated = {c: self.last_captions(model, tokenizer, samples, context=c == "context")
                     for c in ("context", "no_context")}
        scores = {c: score_captions(g, truth, names, class_names) for c, g in generated.items()}
        by_earlier: dict[str, dict[str, Any]] = {}
        for k in sorted({s.num_media - 1 for s in samples}):
            rows = [j for j, s in enumerate(samples) if s.num_media - 1 == k]
            by_earlier[str(k)] = {"n": len(rows), **{
                c: score_captions([g[j] for j in rows], [truth[j] for j in rows], [names[j] for j in rows],
                                  class_names)["emoji_acc_all"] for c, g in generated.items()}}
        gain = {k: scores["context"][k] - scores["no_context"][k] for k in ("bleu4", "cider_d", "emoji_acc_all", "exact")}
        t_max = self.max_media
        protocol = (f"greedy caption of the last image of each held-out sequence ({min(2, t_max)}..{t_max} held-out "
                    f"scenes), at most {self.cfg.eval.max_new_tokens} new tokens; 'context': prompted with the earlier "
                    f"images and their true captions, 'no_context': the last image alone")
        metrics: dict[str, Any] = {
            "eval_split": {"name": "heldout", "held_out": True, "n_sequences": len(samples),
                           "source": f"emoji scenes, held-out split, as sequences of {min(2, t_max)}..{t_max} scenes "
                                     f"(emoji pairs never seen in training)",
                           "skipped_too_long": skipped},
            "num_emoji": len(class_names),
            "caption": dict(scores["context"]),
            "last_image": {"context": scores["context"], "no_context": scores["no_context"], "gain": gain,
                           "emoji_acc_by_earlier_scenes": by_earlier, "protocol": protocol},
        }
        examples = [(s.captions[:-1], generated["context"][j], generated["no_context"][j], truth[j])
                    for j, s in enumerate(samples[:6])]
        base = image_text_report(metrics, torch.stack([s.images[-1] for s in samples]), generated["context"], truth,
                                 grid=self.cfg.eval.grid)
        section = last_image_section(metrics["last_image"], examples).rstrip()
        return metrics, RunReport(sections=[section, *base.sections], figures=base.figures, files=base.files)

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float] | None:
        """Last-image captions of the first ``QUICK_N`` held-out sequences, with context."""
        from ..data.sources import emoji_dataset

        kind = get_sequence_kind(self.cfg.data.kind)
        if kind.quick_eval is not None:
            return kind.quick_eval(self, model, tokenizer)

        samples, _ = self.heldout_sequences(tokenizer, min(QUICK_N, self.cfg.eval.n))
        generated = self.last_captions(model, tokenizer, samples, context=True)
        score = score_captions(generated, [s.captions[-1] for s in samples], [list(s.names[-1]) for s in samples],
                               emoji_dataset(self.cfg.data).class_names())
        return {"last_caption_emoji_acc": score["emoji_acc_all"], "last_caption_bleu4": score["bleu4"]}


def score_captions(generated: list[str], truth: list[str], names: list[list[str]],
                   class_names: list[str]) -> dict[str, Any]:
    """BLEU-4, CIDEr-D (one reference each), emoji-name accuracy (all / 1-emoji / 2-emoji scenes)
    and the share of exact captions."""
    from ..eval.metrics import bleu4, cider_d, emoji_name_accuracy

    refs = [[t] for t in truth]
    acc = emoji_name_accuracy(generated, names, vocabulary=class_names)
    return {"bleu4": bleu4(generated, refs), "cider_d": cider_d(generated, refs),
            "emoji_acc_all": acc["acc"], "emoji_acc_single": acc.get("acc_1"), "n_single": int(acc.get("n_1", 0)),
            "emoji_acc_pair": acc.get("acc_2"), "n_pair": int(acc.get("n_2", 0)),
            "exact": sum(g.strip().lower() == t.strip().lower() for g, t in zip(generated, truth)) / len(truth),
            "n": len(generated)}


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def last_image_section(last: dict[str, Any], examples: list[tuple[tuple[str, ...], str, str, str]]) -> str:
    """Markdown for report.md: the two conditions side by side, accuracy by context length, examples."""
    ctx, alone = last["context"], last["no_context"]
    lines = [f"## Last-image captions ({ctx['n']} held-out sequences)", "", last["protocol"] + ".", "",
             "| metric | with earlier scenes | last image alone | gain |", "|---|---|---|---|"]
    for key, label in (("bleu4", "BLEU-4"), ("cider_d", "CIDEr-D"), ("emoji_acc_all", "names every emoji"),
                       ("emoji_acc_single", f"names the emoji, 1-emoji scenes (n={ctx['n_single']})"),
                       ("emoji_acc_pair", f"names both emoji, 2-emoji scenes (n={ctx['n_pair']})"),
                       ("exact", "exact caption")):
        gain = None if ctx[key] is None or alone[key] is None else ctx[key] - alone[key]
        lines.append(f"| {label} | {_f(ctx[key])} | {_f(alone[key])} | {'n/a' if gain is None else f'{gain:+.3f}'} |")
    lines += ["", "Names every emoji, by earlier scenes in the prompt:", "",
              "| earlier scenes | n | with them | last image alone |", "|---|---|---|---|"]
    for k, row in last["emoji_acc_by_earlier_scenes"].items():
        lines.append(f"| {k} | {row['n']} | {_f(row['context'])} | {_f(row['no_context'])} |")
    lines += ["", "Examples (earlier captions; generated with them / alone; true):", ""]
    for earlier, with_ctx, without, truth in examples:
        lines.append(f"- {' | '.join(earlier)} -> **{with_ctx}** / {without} (true: {truth})")
    return "\n".join(lines)


from . import naming_game as _naming_game  # noqa: E402,F401  (registers data.kind naming_game)

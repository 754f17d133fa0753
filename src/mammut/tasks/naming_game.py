"""``data.kind: naming_game`` for ``train.task: interleaved``: sequences where context matters.

Legend: ``k`` in-context examples (shots), ``T`` = ``model.num_time_embeds``, ``n`` sequences.

Training (:func:`naming_sequences`): sequence ``i`` is a naming-game sequence
(:class:`mammut.data.naming_game.NamingSource`: made-up names for 1..3 emoji shown in 1..T-1
example pairs, then a query scene of one of them (:data:`QUERY_OBJECTS`) captioned with its name) or, with probability
:data:`PLAIN_SHARE` (drawn from ``(train.seed, i)``), a plain interleaved emoji sequence of 1..3
scenes (:class:`mammut.data.interleaved.InterleavedSource`), so the model keeps captioning
with the emoji's own names. Training names and emoji only (the game's held-out ones never
appear in training sequences).

Evaluation (``mammut eval RUN``, :func:`evaluate_naming`), on held-out names and emoji, at
``k`` in :data:`SHOTS` (those ``<= T - 1``), ``n`` (default ``eval.n``) sequences per ``k``:

- the naming game: the query's caption generated greedily after ``k`` example pairs, with
  ``min(k, 3)`` distinct emoji named (``k = 0``: the query alone). Accuracy: the names in the
  caption, in order, are the query's (:func:`mammut.data.naming_game.names_right`); chance:
  guessing among the names the examples define (0 at ``k = 0``: the names are unseen words);
- few-shot captioning of plain held-out emoji scenes: the last scene of a held-out sequence of
  ``k + 1`` scenes (``k`` random held-out scenes and their true captions as the examples, the
  support), BLEU-4, CIDEr-D and emoji-name accuracy against its true caption; ``k = 0`` is the
  last image alone (the ``emoji`` kind's "last image alone").
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch import nn

from ..data.interleaved import InterleavedSample, InterleavedSource
from ..data.naming_game import NamingSource, guess_chance, names_right, naming_corpus
from ..train.data import register_data_kind
from .interleaved import SequenceKind, register_sequence_kind, score_captions

log = logging.getLogger(__name__)

__all__ = ["naming_sequences", "evaluate_naming", "quick_naming", "SHOTS", "PLAIN_SHARE", "MixedSequences"]

SHOTS: tuple[int, ...] = (0, 1, 2, 4)
PLAIN_SHARE = 0.25  # training sequences that are plain interleaved emoji captions
PLAIN_MAX_MEDIA = 3  # scenes in a plain training sequence: 1..3
QUICK_N = 32
QUERY_OBJECTS = 1  # emoji in a query scene (NamingSource takes 2 too: "a ki-mo left of a zo-ta")


class MixedSequences:
    """Index -> a naming-game sequence, or (``PLAIN_SHARE`` of them) a plain emoji sequence."""

    def __init__(self, naming: NamingSource, plain: InterleavedSource, seed: int, plain_share: float = PLAIN_SHARE) -> None:
        self.naming, self.plain, self.seed, self.plain_share = naming, plain, int(seed), float(plain_share)

    def is_plain(self, i: int) -> bool:
        return bool(np.random.default_rng((self.seed, 0x9A11, int(i))).random() < self.plain_share)

    def __call__(self, i: int) -> InterleavedSample:
        return self.plain(i) if self.is_plain(i) else self.naming(i)


def naming_sequences(cfg: Any, max_media: int) -> MixedSequences:
    """The training sequences of ``data.kind: naming_game`` (see the module docstring)."""
    from ..data.sources import emoji_dataset

    scenes = emoji_dataset(cfg.data, "train")
    naming = NamingSource(scenes, max_media, cfg.train.seed, split="train", max_query_objects=QUERY_OBJECTS)
    plain = InterleavedSource(scenes, min(PLAIN_MAX_MEDIA, max_media), cfg.train.seed)
    return MixedSequences(naming, plain, cfg.train.seed)


def _fitting(task: Any, tokenizer: Any, samples: list[InterleavedSample], what: str) -> list[InterleavedSample]:
    """``samples`` unchanged; a ``ValueError`` naming ``data.max_len`` if one does not fit whole."""
    collate = task._collate(tokenizer)
    for s in samples:
        _, kept = collate.fit(s)
        if kept < s.num_media:
            raise ValueError(f"data.max_len: a held-out {what} sequence of {s.num_media} scenes needs more than "
                             f"{task.cfg.data.max_len} tokens; raise data.max_len")
    return samples


def heldout_naming(task: Any, k: int, n: int, names: str = "heldout") -> list[InterleavedSample]:
    """``n`` held-out naming-game sequences with ``k`` examples (held-out emoji; ``names``: the
    held-out names, or ``"train"`` for the diagnostic with training names)."""
    from ..data.sources import DATA_SEED, emoji_dataset

    source = NamingSource(emoji_dataset(task.cfg.data, "heldout"), task.max_media, DATA_SEED, split="heldout",
                          shots=k, distinct=max(1, min(k, 3)), max_query_objects=QUERY_OBJECTS, names=names)
    return [source(i) for i in range(n)]


def heldout_plain(task: Any, k: int, n: int) -> list[InterleavedSample]:
    from ..data.sources import DATA_SEED, emoji_dataset

    source = InterleavedSource(emoji_dataset(task.cfg.data, "heldout"), k + 1, DATA_SEED, min_media=k + 1)
    return [source(i) for i in range(n)]


def _shots(task: Any) -> list[int]:
    return [k for k in SHOTS if k <= task.max_media - 1]


def evaluate_naming(task: Any, model: nn.Module, tokenizer: Any, *, n: int | None = None) -> tuple[dict[str, Any], Any]:
    """Naming-game accuracy and few-shot captioning at each ``k`` (see the module docstring):
    ``(metrics, RunReport)``; ``metrics["caption"]`` holds the captioning scores at the largest ``k``."""
    from ..data.sources import emoji_dataset
    from ..eval.fewshot import prompts_figure
    from ..eval.report import Figure, RunReport, markdown_table

    n = task.cfg.eval.n if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"eval.n: expected an int >= 1 (held-out sequences per shot count), got {n!r}")
    class_names = emoji_dataset(task.cfg.data).class_names()
    naming: dict[str, Any] = {}
    captioning: dict[str, Any] = {}
    shown: list[tuple[InterleavedSample, str]] = []
    for k in _shots(task):
        samples = _fitting(task, tokenizer, heldout_naming(task, k, n), "naming-game")
        generated = task.last_captions(model, tokenizer, samples, context=True)
        right = [names_right(g, s.names[-1]) for g, s in zip(generated, samples)]
        seen = heldout_naming(task, k, n, names="train")
        seen_gen = task.last_captions(model, tokenizer, seen, context=True)
        naming[str(k)] = {"accuracy": sum(right) / n, "chance": sum(guess_chance(s) for s in samples) / n,
                          "exact": sum(g.strip() == s.captions[-1] for g, s in zip(generated, samples)) / n, "n": n,
                          "accuracy_training_names": sum(names_right(g, s.names[-1])
                                                         for g, s in zip(seen_gen, seen)) / n}
        shown += [(s, g) for s, g in zip(samples[:2], generated[:2])]
        plain = _fitting(task, tokenizer, heldout_plain(task, k, n), "captioning")
        gen_plain = task.last_captions(model, tokenizer, plain, context=True)
        captioning[str(k)] = score_captions(gen_plain, [s.captions[-1] for s in plain],
                                            [list(s.names[-1]) for s in plain], class_names)
    top = str(_shots(task)[-1])
    metrics: dict[str, Any] = {
        "eval_split": {"name": "heldout", "held_out": True, "n_sequences": n,
                       "source": "naming game: held-out made-up names and held-out emoji; captioning: held-out emoji "
                                 "scenes (emoji pairs never seen in training)"},
        "num_emoji": len(class_names),
        "naming_game": {"by_shots": naming,
                        "protocol": "greedy caption of the query scene after k example pairs (min(k, 3) distinct "
                                    "held-out emoji named with held-out names); accuracy: the made-up names in the "
                                    "caption, in order, are the query's; chance: guessing among the names the "
                                    "examples define; accuracy_training_names: the same with names drawn from the "
                                    "training names (a diagnostic: context use without unseen words)"},
        "fewshot_caption": {"by_shots": captioning,
                            "protocol": "greedy caption of a held-out scene after k random held-out scenes with "
                                        "their true captions"},
        "caption": dict(captioning[top]),
    }
    rows = [(k, naming[k]["accuracy"], naming[k]["chance"], naming[k]["accuracy_training_names"],
             captioning[k]["cider_d"], captioning[k]["bleu4"], captioning[k]["emoji_acc_all"]) for k in naming]
    section = (f"## Few-shot: naming game and captioning ({n} held-out sequences per k)\n\n"
               + markdown_table(["k (shots)", "naming accuracy", "naming chance",
                                 "naming accuracy, training names (diagnostic)", "captioning CIDEr-D",
                                 "captioning BLEU-4", "captioning names the emoji"], rows)
               + "\n" + metrics["naming_game"]["protocol"] + ". Captioning: "
               + metrics["fewshot_caption"]["protocol"] + ".\n")
    rows_fig = [(s.images, list(s.captions[:-1]), g, s.captions[-1]) for s, g in shown[:6]]
    figure = Figure("naming_prompts.png", lambda path: prompts_figure(rows_fig, path),
                    caption="Held-out naming-game prompts: the example images with their captions, the query image, "
                            "G = generated, T = true", alt="naming prompts")
    return metrics, RunReport(sections=[section], figures=[figure])


def quick_naming(task: Any, model: nn.Module, tokenizer: Any) -> dict[str, float]:
    """Naming-game accuracy at 2 shots (1 if ``T = 2``) on ``QUICK_N`` held-out sequences."""
    k = min(2, task.max_media - 1)
    samples = heldout_naming(task, k, QUICK_N)
    generated = task.last_captions(model, tokenizer, samples, context=True)
    return {f"naming_acc_{k}shot": sum(names_right(g, s.names[-1]) for g, s in zip(generated, samples)) / QUICK_N}


def _reader(*_: Any, **__: Any) -> Any:
    raise ValueError("data.kind: 'naming_game' is read by train.task='interleaved', got another task")


def _corpus(cfg: Any) -> list[str]:
    from ..data.sources import emoji_corpus, emoji_dataset

    return emoji_corpus(emoji_dataset(cfg).class_names()) + naming_corpus()


def _check(cfg: Any) -> None:
    from ..data.naming_game import emoji_split

    emoji_split(cfg.num_emoji, "train")


register_data_kind("naming_game", _reader, corpus=_corpus, check=_check)
register_sequence_kind(SequenceKind("naming_game", naming_sequences, evaluate_naming, quick_naming))

"""Evaluation metrics for image-text models.

* :func:`retrieval_recall` -- image->text and text->image Recall@k.
* :func:`zero_shot_accuracy`, :func:`zero_shot_classifier`, :func:`zero_shot_predictions`
  -- zero-shot classification.
* :func:`caption_metrics`, :func:`bleu4`, :func:`cider_d` -- caption metrics through
  pycocoevalcap (:mod:`mammut.eval.caption_metrics`).
* :func:`emoji_name_accuracy` -- share of captions that name every emoji in the scene.

Ranks are *pessimistic*: an item that ties with the correct one counts as ranked above
it, so degenerate (constant) embeddings score chance level, not perfect.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

_WORD = re.compile(r"\w+(?:[-']\w+)*")


# ----------------------------------------------------------------------------- helpers


def _check_embeds(x: object, arg: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{arg} must have shape (n, dim) with n >= 1, got {tuple(x.shape)}")
    x = x.detach().float()
    bad = int((~torch.isfinite(x)).any(dim=1).sum())
    if bad:
        # a NaN compares False with everything, so a pessimistic rank would come out 0: a "hit"
        raise ValueError(f"{arg}: expected finite embeddings, got {bad} of {x.shape[0]} rows with NaN or inf")
    return x


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a sequence of ints >= 1, got {ks!r}")
    return tuple(ks)


def tokenize_caption(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (punctuation dropped, hyphenated words kept)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------- retrieval


@torch.no_grad()
def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    text_to_image: torch.Tensor | Sequence[int] | None = None,
    normalize: bool = True,
    chunk_size: int = 1024,
    texts: Sequence[str] | None = None,
) -> dict[str, float]:
    """Recall@k for image->text (``i2t_R@k``) and text->image (``t2i_R@k``), as fractions in [0, 1].

    Pairs are 1:1 (text j belongs to image j) unless ``text_to_image[j]`` gives the image
    of text j (several captions per image, the COCO / Flickr30k protocol): an image counts as
    retrieved correctly at k if any of its captions ranks within the top k, a text if its
    image does. With ``texts`` (the caption strings), identical strings are one answer: a
    caption whose text equals one of the image's captions is a hit for that image, and a text
    shared by several images is answered by any of them (identical texts have identical
    embeddings, so no ranking could tell them apart). Ties rank against the correct item.
    """
    img = _check_embeds(image_embeds, "image_embeds")
    txt = _check_embeds(text_embeds, "text_embeds")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding dims differ: image_embeds {tuple(img.shape)}, text_embeds {tuple(txt.shape)}")
    ks = _check_ks(ks)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"without text_to_image the pairs must be 1:1, got {n_img} images and {n_txt} texts")
        t2i = torch.arange(n_txt)
    else:
        t2i = torch.as_tensor(text_to_image, dtype=torch.long).flatten()
        if t2i.numel() != n_txt:
            raise ValueError(f"text_to_image must have one entry per text ({n_txt}), got {t2i.numel()}")
        if t2i.min() < 0 or t2i.max() >= n_img:
            raise ValueError(f"text_to_image entries must be in [0, {n_img}), got range [{int(t2i.min())}, {int(t2i.max())}]")
        if torch.bincount(t2i, minlength=n_img).min() == 0:
            raise ValueError("every image needs at least one text in text_to_image")
    if texts is not None:
        if len(texts) != n_txt:
            raise ValueError(f"texts: expected one string per text embedding ({n_txt}), got {len(texts)}")
        ids: dict[str, int] = {}
        answer = torch.tensor([ids.setdefault(t, len(ids)) for t in texts], dtype=torch.long)
    else:
        answer = torch.arange(n_txt)
    # incidence (n_img, n_answers): image i has a caption with answer a
    has = torch.zeros(n_img, int(answer.max()) + 1, dtype=torch.bool)
    has[t2i, answer] = True
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    has, answer = has.to(img.device), answer.to(img.device)

    def rank(sim: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        best = sim.masked_fill(~true, float("-inf")).amax(dim=1, keepdim=True)
        return ((sim >= best) & ~true).sum(dim=1).cpu()

    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk_size):
        sim = img[s : s + chunk_size] @ txt.T  # (c, n_txt)
        i2t_rank[s : s + sim.shape[0]] = rank(sim, has[s : s + sim.shape[0]][:, answer])
    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk_size):
        sim = txt[s : s + chunk_size] @ img.T  # (c, n_img)
        t2i_rank[s : s + sim.shape[0]] = rank(sim, has[:, answer[s : s + sim.shape[0]]].T)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out


# ----------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def zero_shot_accuracy(
    image_embeds: torch.Tensor,
    class_text_embeds: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    k: int = 1,
    normalize: bool = True,
) -> float:
    """Top-``k`` accuracy of classifying images by their most similar class embedding."""
    img = _check_embeds(image_embeds, "image_embeds")
    cls = _check_embeds(class_text_embeds, "class_text_embeds")
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"embedding dims differ: image_embeds {tuple(img.shape)}, class_text_embeds {tuple(cls.shape)}")
    y = torch.as_tensor(labels, dtype=torch.long).flatten().to(img.device)
    if y.numel() != img.shape[0]:
        raise ValueError(f"labels must have one entry per image ({img.shape[0]}), got {y.numel()}")
    if y.min() < 0 or y.max() >= cls.shape[0]:
        raise ValueError(f"labels must be in [0, {cls.shape[0]}), got range [{int(y.min())}, {int(y.max())}]")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if normalize:
        img, cls = F.normalize(img, dim=-1), F.normalize(cls, dim=-1)
    logits = img @ cls.T
    true = logits.gather(1, y[:, None])
    rank = (logits >= true).sum(dim=1) - 1
    return (rank < k).float().mean().item()


@torch.no_grad()
def zero_shot_predictions(
    image_embeds: torch.Tensor,
    class_embeds: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    normalize: bool = True,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ranks, predictions)`` of images against class embeddings: the pessimistic rank of each
    image's true class (0 = strictly above every other class; ties count against it) and the
    predicted class (the true class only at rank 0, else the best other class), so
    ``predictions == labels`` exactly when ``ranks == 0``."""
    img = _check_embeds(image_embeds, "image_embeds")
    cls = _check_embeds(class_embeds, "class_embeds")
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"embedding dims differ: image_embeds {tuple(img.shape)}, class_embeds {tuple(cls.shape)}")
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.numel() != img.shape[0]:
        raise ValueError(f"labels must have one entry per image ({img.shape[0]}), got {y.numel()}")
    if y.numel() and (y.min() < 0 or y.max() >= cls.shape[0]):
        raise ValueError(f"labels must be in [0, {cls.shape[0]}), got range [{int(y.min())}, {int(y.max())}]")
    if normalize:
        img, cls = F.normalize(img, dim=-1), F.normalize(cls, dim=-1)
    ranks = torch.empty(len(y), dtype=torch.long)
    preds = torch.empty(len(y), dtype=torch.long)
    for s in range(0, len(y), chunk_size):
        ranks[s:s + chunk_size], preds[s:s + chunk_size] = score_predictions(img[s:s + chunk_size] @ cls.T,
                                                                            y[s:s + chunk_size])
    return ranks, preds


def score_predictions(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ranks, predictions)`` from class scores ``(n, c)`` (higher is better) and ``labels``
    ``(n,)``, with :func:`zero_shot_predictions`' rules: the pessimistic rank of the true class
    (ties against it) and the prediction (the true class only at rank 0)."""
    if scores.dim() != 2 or scores.shape[0] != labels.numel():
        raise ValueError(f"scores: expected (n, classes) with n = {labels.numel()} labels, got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores: NaN class scores (the model's outputs are not finite)")
    yy = labels.view(-1, 1).long()
    true = scores.gather(1, yy)
    ranks = (scores >= true).sum(dim=1) - 1
    other = scores.scatter(1, yy, float("-inf")).argmax(dim=1) if scores.shape[1] > 1 else yy[:, 0]
    return ranks, torch.where(ranks == 0, yy[:, 0], other)


def classification_metrics(ranks: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor | Sequence[int],
                           n_classes: int, ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Top-k accuracy (``top1``, ``top5``, ...), per-class recall (``None`` for a class with
    no image), ``mean_per_class_recall`` (over classes with images) and the confusion matrix
    ``(n_classes, n_classes)`` (rows: true class, columns: predicted), from
    :func:`zero_shot_predictions`."""
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if not (len(y) == len(ranks) == len(predictions)) or len(y) == 0:
        raise ValueError(f"labels, ranks, predictions: expected equal non-zero lengths, got "
                         f"{len(y)}, {len(ranks)}, {len(predictions)}")
    out: dict[str, Any] = {f"top{k}": (ranks < k).float().mean().item() for k in _check_ks(ks)}
    confusion = torch.bincount(y * n_classes + predictions, minlength=n_classes * n_classes).view(n_classes, n_classes)
    support = confusion.sum(dim=1)
    recall = [None if int(n) == 0 else float(confusion[c, c]) / float(n) for c, n in enumerate(support)]
    seen = [r for r in recall if r is not None]
    out.update({"mean_per_class_recall": sum(seen) / len(seen), "per_class_recall": recall,
                "support": support.tolist(), "confusion": confusion})
    return out


DEFAULT_TEMPLATES: tuple[str, ...] = ("a {}", "a picture of a {}", "an image of a {}", "a {} on a plain background")


@torch.no_grad()
def zero_shot_classifier(
    class_names: Sequence[str],
    encode_text: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings (C, D): mean of the L2-normalised template embeddings, re-normalised.

    ``templates`` are format strings with one ``{}`` for the class name;
    ``encode_text`` maps a list of strings to a (b, D) tensor.
    """
    if isinstance(class_names, str) or not class_names or not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"class_names must be a non-empty list of str, got {class_names!r:.80}")
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of str each containing '{{}}', got {templates!r:.80}")
    if not callable(encode_text):
        raise TypeError(f"encode_text must be callable, got {type(encode_text).__name__}")
    texts = [t.format(c) for c in class_names for t in templates]
    chunks = []
    for s in range(0, len(texts), batch_size):
        emb = encode_text(texts[s : s + batch_size])
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts[s : s + batch_size]):
            raise ValueError(f"encode_text must return a (batch, dim) tensor, got {getattr(emb, 'shape', type(emb))}")
        chunks.append(F.normalize(emb.detach().float(), dim=-1))
    emb = torch.cat(chunks).view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


# ----------------------------------------------------------------------------- captions


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], **kwargs: Any) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap (see
    :func:`mammut.eval.caption_metrics.caption_scores` for the options and tokenisation)."""
    from .caption_metrics import caption_scores

    return caption_scores(candidates, references, **kwargs)


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] (pycocoevalcap's ``Bleu(4)``: clipped n-gram precisions, closest
    reference length for the brevity penalty)."""
    return caption_metrics(candidates, references, metrics=("bleu",))["bleu4"]


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap's ``Cider``, which is CIDEr-D): idf over the references
    of all items, so a single-item corpus scores 0."""
    return caption_metrics(candidates, references, metrics=("cider_d",))["cider_d"]


# ----------------------------------------------------------------------------- emoji names


def _find_mentions(tokens: Sequence[str], vocab: dict[str, list[tuple[str, ...]]]) -> list[str]:
    """Greedy, longest-first, non-overlapping vocabulary mentions in ``tokens``."""
    found, i = [], 0
    while i < len(tokens):
        for cand in vocab.get(tokens[i], ()):
            if tuple(tokens[i : i + len(cand)]) == cand:
                found.append(" ".join(cand))
                i += len(cand)
                break
        else:
            i += 1
    return found


def _contains(tokens: Sequence[str], phrase: Sequence[str]) -> bool:
    m = len(phrase)
    return m > 0 and any(tuple(tokens[i : i + m]) == tuple(phrase) for i in range(len(tokens) - m + 1))


def emoji_name_accuracy(
    captions: Sequence[str],
    emoji_names_per_item: Sequence[Sequence[str]],
    vocabulary: Sequence[str] | None = None,
) -> dict[str, float]:
    """Share of captions that name every true emoji, overall (``acc``) and per object count (``acc_1``, ``acc_2``, ...).

    A name counts when its words appear contiguously in the caption.  With
    ``vocabulary`` (all emoji names), mentions are parsed longest-first, so "cat" is not
    credited by "cat face", and a name repeated in a scene must be mentioned that often.
    Also returns the item counts ``n``, ``n_1``, ``n_2``, ...
    """
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
    if isinstance(emoji_names_per_item, str) or not isinstance(emoji_names_per_item, Sequence):
        raise TypeError(f"emoji_names_per_item must be a list of lists of str, got {type(emoji_names_per_item).__name__}")
    if len(captions) != len(emoji_names_per_item):
        raise ValueError(f"captions and emoji_names_per_item must have equal length, "
                         f"got {len(captions)} and {len(emoji_names_per_item)}")
    if not captions:
        raise ValueError("captions must not be empty")
    vocab_index: dict[str, list[tuple[str, ...]]] | None = None
    if vocabulary is not None:
        vocab_index = {}
        for name in vocabulary:
            toks = tuple(tokenize_caption(name))
            if toks:
                vocab_index.setdefault(toks[0], []).append(toks)
        for lst in vocab_index.values():
            lst.sort(key=len, reverse=True)
    hits: Counter[int] = Counter()
    counts: Counter[int] = Counter()
    for i, (cap, names) in enumerate(zip(captions, emoji_names_per_item)):
        if not isinstance(cap, str):
            raise TypeError(f"captions[{i}] must be a str, got {type(cap).__name__}")
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise TypeError(f"emoji_names_per_item[{i}] must be a non-empty list of str, got {names!r:.80}")
        tokens = tokenize_caption(cap)
        true = [" ".join(tokenize_caption(nm)) for nm in names]
        if vocab_index is not None:
            mentioned = Counter(_find_mentions(tokens, vocab_index))
            ok = not (Counter(true) - mentioned)
        else:
            ok = all(_contains(tokens, t.split()) for t in true)
        counts[len(names)] += 1
        hits[len(names)] += int(ok)
    total = sum(counts.values())
    out = {"acc": sum(hits.values()) / total, "n": float(total)}
    for k in sorted(counts):
        out[f"acc_{k}"] = hits[k] / counts[k]
        out[f"n_{k}"] = float(counts[k])
    return out

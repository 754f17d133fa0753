"""Few-shot (in-context) evaluation, as open_flamingo's evaluation does it, for models that take
media sequences (FlamingoPaLM): ``mammut eval caption SOURCE --data D --shots K --support S``.

Legend: ``k`` shots (in-context examples), ``q`` query images, ``s`` support images, ``l``
embedding width, ``H``/``W`` pixels.

Every query image gets a prompt of ``k`` examples drawn from a *support set* (image files with
captions: the same formats as ``--data``; default the evaluated data itself, the query never
in its own support) followed by the query::

    [BOS] <image> caption_1 <image> caption_2 ... <image> caption_k <image>      images (k + 1, 3, H, W)

and the model writes the query's caption; ``k = 0`` is the plain prompt ``[BOS] <image>``.
Example selection (``--selection``):

- ``random``: ``k`` support items drawn per query from a generator seeded with
  ``(--seed, query index)``, the query's own file excluded;
- ``rices`` (retrieval-based in-context example selection): the ``k`` support images with the
  highest cosine similarity to the query's image embedding (the query's own file excluded),
  placed in increasing similarity so the most similar example sits next to the query. The
  embeddings come from ``--rices-run RUN`` (any contrastive model ``mammut.load`` loads, e.g.
  the pretraining run whose ViT the Flamingo run froze) or, without it, from the evaluated
  model when it is contrastive itself.

The example captions are the support's first reference caption, tokenized on their own and
joined by id (as the ``interleaved`` task's training sequences are). Scored like zero-shot
captioning (:mod:`mammut.eval.caption_metrics`) but without METEOR (CIDEr-D, BLEU, ROUGE-L); the report shows a few prompts with their
example images and the generated caption (:func:`prompts_figure`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FEWSHOT_METRICS = ("bleu", "rouge_l", "cider_d")

__all__ = ["require_media_model", "select_random", "select_rices",
           "build_prompt_ids", "vqa_prompt_ids", "evaluate_fewshot_captioning", "evaluate_fewshot_vqa",
           "prompts_figure"]

def require_media_model(em: Any, shots: int) -> None:
    """A ``ValueError`` naming ``--shots`` unless ``em`` takes media sequences (only for ``shots > 0``)."""
    if shots > 0 and not em.media:
        raise ValueError(f"--shots: {shots} in-context examples need a model that takes media sequences "
                         f"(FlamingoPaLM), got {em.name} from {em.source}; use --shots 0")


def select_random(n_query: int, support_keys: Sequence[Any], query_keys: Sequence[Any], k: int,
                  seed: int = 0) -> list[list[int]]:
    """For each query ``i``, ``k`` support indices drawn without replacement from a generator
    seeded with ``(seed, i)``, never one whose key equals the query's key (its own file)."""
    out = []
    for i in range(n_query):
        allowed = [j for j, key in enumerate(support_keys) if key != query_keys[i]]
        if len(allowed) < k:
            raise ValueError(f"--support: expected at least {k} support images other than the query, got {len(allowed)}")
        rng = np.random.default_rng((int(seed), i))
        out.append([allowed[j] for j in rng.choice(len(allowed), size=k, replace=False)])
    return out


def select_rices(query_emb: torch.Tensor, support_emb: torch.Tensor, support_keys: Sequence[Any],
                 query_keys: Sequence[Any], k: int) -> list[list[int]]:
    """For each query (``query_emb`` (q, l), ``support_emb`` (s, l), both L2-normalised), the
    ``k`` most similar support items by cosine, never the query's own (equal key), ordered by
    increasing similarity (the most similar last: next to the query)."""
    if len(support_keys) - 1 < k and any(key in set(support_keys) for key in query_keys):
        raise ValueError(f"--support: expected at least {k} support images other than the query, got fewer")
    if len(support_keys) < k:
        raise ValueError(f"--support: expected at least {k} support images, got {len(support_keys)}")
    sim = query_emb.float() @ support_emb.float().T  # (q, s)
    index = {key: j for j, key in enumerate(support_keys)}
    for i, key in enumerate(query_keys):
        j = index.get(key)
        if j is not None:
            sim[i, j] = float("-inf")
    top = sim.topk(k, dim=1).indices  # (q, k), most similar first
    return [list(reversed(row)) for row in top.tolist()]


def build_prompt_ids(tokenizer: Any, captions: Sequence[str], *, media_id: int, bos_id: int) -> list[int]:
    """``[BOS] <image> c_1 ... <image> c_k <image>`` (each caption tokenized on its own)."""
    from ..data.interleaved import build_prompt, caption_ids

    return build_prompt(caption_ids(tokenizer, captions) if captions else [], media_id=media_id, bos_id=bos_id)


def _load_images(paths: Sequence[Path], preprocess: Any, what: str) -> torch.Tensor:
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as image:
                out.append(preprocess(image.convert("RGB")))
        except OSError as exc:
            raise OSError(f"{what}: cannot read image {p}: {exc}") from None
    return torch.stack(out)


def _embed_paths(emb: Any, paths: Sequence[Path], what: str, batch_size: int) -> torch.Tensor:
    """L2-normalised image embeddings ``(n, l)`` of ``paths``, loaded and embedded batch by batch."""
    return torch.cat([emb.embed_images(_load_images(paths[i:i + batch_size], emb.preprocess, what))
                      for i in range(0, len(paths), batch_size)])


def _rices_embedder(em: Any, rices_run: str | None, device: Any) -> Any:
    if rices_run is not None:
        from .model_source import load_eval_model

        other = load_eval_model(rices_run, device=str(device), precision="fp32")
        if not other.contrastive:
            raise ValueError(f"--rices-run: expected a contrastive model (embed_image), got {other.name} from {rices_run}")
        return other
    if not em.contrastive:
        raise ValueError(f"--selection: rices needs image embeddings: give --rices-run RUN (a contrastive model), "
                         f"{em.name} has none")
    return em


@torch.no_grad()
def generate_with_examples(em: Any, query: Sequence[Path], examples: Sequence[Sequence[Path]],
                           example_texts: Sequence[Sequence[str]], options: dict[str, Any], batch_size: int, *,
                           prompt: Any = None) -> list[str]:
    """The generations for the ``query`` image files, each after its example files
    (``examples[i]``) with their texts (``example_texts[i]``); images are read batch by batch.
    ``prompt(i) -> ids`` (default: the captioning prompt of ``example_texts[i]``)."""
    model = em.model
    media_id, bos = model.media_token_id, model.config.bos_id
    if prompt is None:
        def prompt(i: int) -> list[int]:
            return build_prompt_ids(em.tokenizer, example_texts[i], media_id=media_id, bos_id=bos)
    out: list[str] = []
    was = model.training
    model.eval()
    try:
        for start in range(0, len(query), batch_size):
            rows = range(start, min(start + batch_size, len(query)))
            images = torch.stack([_load_images([*examples[i], query[i]], em.preprocess, "--data / --support")
                                  for i in rows]).to(em.device)
            with em.autocast():
                ids = model.generate(images, prompt=[prompt(i) for i in rows], **options)
            out += [t.strip() for t in em.tokenizer.decode(ids.cpu())]
    finally:
        model.train(was)
    return out


def evaluate_fewshot_captioning(em: Any, args: argparse.Namespace, out_dir: Path, *,
                                generation: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
    """``mammut eval caption ... --shots K`` (K > 0): few-shot captioning, scored as zero-shot
    captioning is; returns ``(metrics, report sections, figures)``."""
    from ..data.formats import read_captioned_images
    from .caption_metrics import caption_scores
    from .captioning import LABELS
    from .images import seeded_subset
    from .report import markdown_table

    k = args.shots
    require_media_model(em, k)
    ds = read_captioned_images(args.data, args.images, split=args.split, img_key=args.img_key,
                               caption_key=args.caption_key)
    sup = ds if args.support is None else read_captioned_images(
        args.support, args.support_images, split=None, img_key=args.img_key, caption_key=args.caption_key,
        arg="--support")
    keep = seeded_subset(len(ds.paths), args.limit)
    q_paths = [ds.paths[i] for i in keep]
    refs = [ds.captions[i] for i in keep]
    t0 = time.perf_counter()
    chosen, embedder_name = choose_examples(em, args, q_paths, list(sup.paths), k, query_arg="--data")
    examples = [[sup.paths[j] for j in row] for row in chosen]
    captions = [[sup.captions[j][0] for j in row] for row in chosen]
    generated = generate_with_examples(em, q_paths, examples, captions, generation, args.batch_size)
    seconds = time.perf_counter() - t0
    # CIDEr-D (what open_flamingo reports), BLEU and ROUGE-L; METEOR (a Java process) left out
    scores = caption_scores(generated, refs, metrics=FEWSHOT_METRICS, tokenizer=args.tokenizer)
    metrics: dict[str, Any] = {
        **{key: scores.get(key) for key in LABELS if key in scores}, "n_images": len(q_paths), "shots": k,
        "selection": args.selection, "rices_embeddings": embedder_name,
        "support": str(args.support or args.data), "support_size": len(sup.paths),
        "support_is_data": args.support is None, "tokenizer": scores["tokenizer"], "absent": scores["absent"],
        "generation": generation, "comparable_to_published": False,
        "not_comparable_because": [f"{k}-shot in-context captioning on this support set"],
        "images_per_s": len(q_paths) / seconds if seconds > 0 else None,
        "mean_caption_words": sum(len(c.split()) for c in generated) / max(1, len(generated)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [(LABELS[key], metrics[key]) for key in LABELS if key in metrics]
    how = ("random (seed %d)" % args.seed) if args.selection == "random" else f"RICES ({embedder_name})"
    section = (f"## {k}-shot captioning of {len(q_paths)} images of {ds.source}\n\n"
               + markdown_table(["metric", "value"], rows)
               + f"\nExamples: {k} per query from {args.support or args.data} ({len(sup.paths)} images), selected "
                 f"{how}, the query never among its own. Prompt: `[BOS] <image> caption ... <image> caption <image>`.\n")
    shown = [(_load_images([*examples[i], q_paths[i]], em.preprocess, "--data"), captions[i], generated[i], refs[i][0])
             for i in range(min(6, len(q_paths)))]
    fig = prompts_figure(shown, out_dir / "fewshot_prompts.png")
    return metrics, [section], [("Prompts: the example images with their captions, then the query with the "
                                 "generated (G) and a reference (T) caption", fig)]


def prompts_figure(rows: Sequence[tuple[torch.Tensor, Sequence[str], str, str]], path: Path) -> Path | None:
    """One figure row per prompt: its example images titled with their captions, then the query
    image titled ``G: generated`` / ``T: true``. ``rows``: ``(images (t, 3, H, W), the t - 1
    example captions, generated, true)``."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(images) for images, *_ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.6 * len(rows)), squeeze=False)
    for r, (images, captions, generated, truth) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(images):
                continue
            img = images[c].detach().float().cpu()
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else img.clamp(0, 1)
            ax.imshow(img.permute(1, 2, 0).numpy())
            if c < len(images) - 1:
                ax.set_title(captions[c], fontsize=8)
            else:
                ok = generated.strip().lower() == truth.strip().lower()
                ax.set_title(f"G: {generated}\nT: {truth}", fontsize=8, color="green" if ok else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- VQA


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    from ..data.interleaved import caption_ids

    return caption_ids(tokenizer, [text])[0]


def vqa_prompt_ids(tokenizer: Any, examples: Sequence[tuple[str, str]], question: str, template: str, *,
                   media_id: int, bos_id: int) -> list[int]:
    """``[BOS] <image> q_1 a_1 ... <image> q_k a_k <image> q`` with each ``q`` written by
    ``template`` (``{question}``); ``examples``: ``(question, answer)`` pairs."""
    ids = [bos_id]
    for q, a in examples:
        ids += [media_id, *_text_ids(tokenizer, f"{template.format(question=q)} {a}")]
    return [*ids, media_id, *_text_ids(tokenizer, template.format(question=question))]


def evaluate_fewshot_vqa(em: Any, args: argparse.Namespace, out_dir: Path, *,
                         generation: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[tuple[str, Path | None]]]:
    """``mammut eval vqa ... --shots K`` (K > 0): each question after ``k`` example questions
    with their most common answer, from the support set (``--support`` questions with
    ``--support-annotations`` and ``--support-images``; default the evaluated questions, never
    one about the query's own image); scored by the VQAv2 rule."""
    from collections import Counter

    from ..data.formats import read_vqa
    from .images import seeded_subset
    from .report import markdown_table
    from .vqa import DEFAULT_PROMPT, _breakdown, question_accuracy

    k = args.shots
    require_media_model(em, k)
    template = args.prompt or DEFAULT_PROMPT
    try:
        template.format(question="q")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"--prompt: expected a template with a {{question}} field, got {template!r} ({exc})") from None
    vqa = read_vqa(args.questions, args.annotations, args.images, image_template=args.image_template)
    if args.support is None:
        sup = vqa
    else:
        if not args.support_annotations:
            raise ValueError("--support-annotations: expected the support questions' annotations JSON with --support")
        sup = read_vqa(args.support, args.support_annotations, args.support_images or args.images,
                       image_template=args.image_template)
    qs = [vqa.questions[i] for i in seeded_subset(len(vqa.questions), args.limit)]
    sq = [q for q in sup.questions if q.answers]
    q_paths = [Path(vqa.image_paths[q.image_id]) for q in qs]
    s_paths = [Path(sup.image_paths[q.image_id]) for q in sq]
    t0 = time.perf_counter()
    chosen, embedder_name = choose_examples(em, args, q_paths, s_paths, k, query_arg="--images")
    model = em.model
    media_id, bos = model.media_token_id, model.config.bos_id
    examples_of = [[(sq[j].question, Counter(sq[j].answers).most_common(1)[0][0]) for j in row] for row in chosen]
    example_paths = [[s_paths[j] for j in row] for row in chosen]

    def prompt(i: int) -> list[int]:
        return vqa_prompt_ids(em.tokenizer, examples_of[i], qs[i].question, template, media_id=media_id, bos_id=bos)

    answers = generate_with_examples(em, q_paths, example_paths, [], generation, args.batch_size, prompt=prompt)
    seconds = time.perf_counter() - t0
    acc = [question_accuracy(a, q.answers) for a, q in zip(answers, qs)]
    metrics: dict[str, Any] = {
        "accuracy": sum(acc) / len(acc), "n_questions": len(qs), "shots": k, "selection": args.selection,
        "rices_embeddings": embedder_name, "support": str(args.support or args.questions), "support_size": len(sq),
        "support_is_data": args.support is None, "prompt": template, "generation": generation,
        "per_answer_type": _breakdown(acc, [q.answer_type for q in qs]),
        "comparable_to_published": False, "not_comparable_because": [f"{k}-shot in-context VQA on this support set"],
        "questions_per_s": len(qs) / seconds if seconds > 0 else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "answers.json").write_text(json.dumps(
        [{"question_id": q.question_id, "answer": a} for q, a in zip(qs, answers)], indent=1))
    per_type = metrics["per_answer_type"]
    how = ("random (seed %d)" % args.seed) if args.selection == "random" else f"RICES ({embedder_name})"
    section = (f"## {k}-shot VQA accuracy on {len(qs)} questions\n\n"
               + markdown_table(["answer type", "questions", "accuracy"],
                                [(t, v["n"], v["accuracy"]) for t, v in per_type.items()]
                                + [("**all**", len(qs), metrics["accuracy"])])
               + f"\nExamples: {k} per question from {metrics['support']} ({len(sq)} questions), selected {how}, "
                 f"never about the query's own image; each `<image> {template} <most common answer>`.\n")
    shown = [(_load_images([*example_paths[i], q_paths[i]], em.preprocess, "--images"),
              [f"{q} {a}" for q, a in examples_of[i]], f"{qs[i].question} {answers[i]}",
              f"{qs[i].question} {Counter(qs[i].answers).most_common(1)[0][0]}") for i in range(min(6, len(qs)))]
    fig = prompts_figure(shown, out_dir / "fewshot_prompts.png")
    return metrics, [section], [("Prompts: the example images with their question and answer, then the query with "
                                 "the generated (G) and the most common reference (T) answer", fig)]

def choose_examples(em: Any, args: argparse.Namespace, q_paths: list[Path], s_paths: list[Path], k: int, *,
                    query_arg: str) -> tuple[list[list[int]], str | None]:
    """For each query image, the indices of its ``k`` support examples (``args.selection``:
    random, seeded, or RICES through ``args.rices_run`` / the evaluated model; a query's own
    file is never among them), and the name of the embedder RICES used (None for random).
    Each distinct file is embedded once."""
    q_keys, s_keys = [p.resolve() for p in q_paths], [p.resolve() for p in s_paths]
    if args.selection == "random":
        return select_random(len(q_paths), s_keys, q_keys, k, args.seed), None
    emb = _rices_embedder(em, args.rices_run, em.device)
    unique_q, unique_s = list(dict.fromkeys(q_paths)), list(dict.fromkeys(s_paths))
    q_emb = _embed_paths(emb, unique_q, query_arg, args.batch_size)
    s_emb = _embed_paths(emb, unique_s, "--support", args.batch_size)
    q_row, s_row = {p: j for j, p in enumerate(unique_q)}, {p: j for j, p in enumerate(unique_s)}
    chosen = select_rices(q_emb[[q_row[p] for p in q_paths]], s_emb[[s_row[p] for p in s_paths]], s_keys, q_keys, k)
    return chosen, f"{emb.name} from {emb.source}"

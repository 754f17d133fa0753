"""Evaluation metrics on hand-checkable inputs."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from mammut.eval.caption_metrics import caption_scores, ptb_tokenize, simple_ptb_tokenize
from mammut.eval.metrics import (
    bleu4,
    cider_d,
    classification_metrics,
    emoji_name_accuracy,
    retrieval_recall,
    tokenize_caption,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_predictions,
)

# ----------------------------------------------------------------------------- retrieval


def _sim_as_embeds(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose dot products are exactly ``sim`` (use with normalize=False)."""
    return torch.eye(sim.shape[0]), sim.T.contiguous()


def test_recall_identity_is_perfect() -> None:
    e = torch.randn(20, 8)
    r = retrieval_recall(e, e.clone(), ks=(1, 5))
    assert r == {"i2t_R@1": 1.0, "i2t_R@5": 1.0, "t2i_R@1": 1.0, "t2i_R@5": 1.0}


def test_recall_hand_built_similarity_distinguishes_directions() -> None:
    # rows = images, columns = texts; text j belongs to image j
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.6, 0.3, 0.1]])
    img, txt = _sim_as_embeds(sim)
    r = retrieval_recall(img, txt, ks=(1, 2, 3), normalize=False)
    # image ranks of the true text: 0, 1, 2 ; text ranks of the true image: 0, 0, 2
    assert r["i2t_R@1"] == pytest.approx(1 / 3)
    assert r["i2t_R@2"] == pytest.approx(2 / 3)
    assert r["i2t_R@3"] == pytest.approx(1.0)
    assert r["t2i_R@1"] == pytest.approx(2 / 3)
    assert r["t2i_R@2"] == pytest.approx(2 / 3)
    assert r["t2i_R@3"] == pytest.approx(1.0)


def test_recall_permuted_identity_counts_ties_against() -> None:
    n = 10
    perm = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9, 3])  # fixed points 0, 1, 2
    img = torch.eye(n)
    txt = torch.eye(n)[perm]  # sim(i, j) = 1 iff perm[j] == i
    r = retrieval_recall(img, txt, ks=(1, 5, 10))
    # non-fixed images: one wrong text scores 1, the true text ties with 8 others at 0 -> rank 9
    assert r["i2t_R@1"] == pytest.approx(0.3)
    assert r["i2t_R@5"] == pytest.approx(0.3)
    assert r["i2t_R@10"] == pytest.approx(1.0)
    assert r["t2i_R@1"] == pytest.approx(0.3)
    assert r["t2i_R@5"] == pytest.approx(0.3)


def test_recall_constant_embeddings_are_not_perfect() -> None:
    r = retrieval_recall(torch.ones(5, 4), torch.ones(5, 4), ks=(1,))
    assert r["i2t_R@1"] == 0.0 and r["t2i_R@1"] == 0.0


def test_recall_multiple_captions_per_image() -> None:
    # 2 images, 4 texts: texts 0,1 -> image 0 ; texts 2,3 -> image 1
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.2, 0.3, 0.1]])
    img = torch.eye(2)
    txt = sim.T.contiguous()
    r = retrieval_recall(img, txt, ks=(1, 2), text_to_image=[0, 0, 1, 1], normalize=False, chunk_size=1)
    # image 0: best own text 0.9 is top -> hit@1 ; image 1: best own 0.3 < 0.8 (text 0) -> rank 1
    assert r["i2t_R@1"] == pytest.approx(0.5)
    assert r["i2t_R@2"] == pytest.approx(1.0)
    # text columns: t0 [0.1, 0.8] -> image 0 rank 1; t1 [0.9, 0.2] rank 0; t2 [0.5, 0.3] rank 1; t3 [0, 0.1] rank 0
    assert r["t2i_R@1"] == pytest.approx(0.5)
    assert r["t2i_R@2"] == pytest.approx(1.0)


def test_recall_validates_input() -> None:
    with pytest.raises(ValueError, match="1:1"):
        retrieval_recall(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="dims"):
        retrieval_recall(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="image_embeds"):
        retrieval_recall([[1.0]], torch.randn(1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one text"):
        retrieval_recall(torch.randn(3, 4), torch.randn(3, 4), text_to_image=[0, 0, 1])


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_accuracy_known_values() -> None:
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.5], [0.0, 0.9, 1.0], [0.9, 1.0, 0.0]])
    labels = [0, 1, 2, 0]  # last one is wrong at top-1 (class 1 wins) but right at top-2
    assert zero_shot_accuracy(images, classes, labels) == pytest.approx(0.75)
    assert zero_shot_accuracy(images, classes, labels, k=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy(images, classes, [0, 1, 2, 3])


def test_zero_shot_predictions_ties_and_per_class_metrics() -> None:
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.2, 0.0],   # class 0, right
                           [0.5, 0.5, 0.0],   # class 0, tied with class 1: counts against -> predicted 1
                           [0.0, 0.9, 1.0],   # class 1, class 2 wins
                           [0.0, 0.0, 1.0],   # class 2, right
                           [0.3, 0.0, 1.0]])  # class 2, right
    labels = [0, 0, 1, 2, 2]
    ranks, preds = zero_shot_predictions(images, classes, labels, normalize=False)
    assert ranks.tolist() == [0, 1, 1, 0, 0] and preds.tolist() == [0, 1, 2, 2, 2]
    out = classification_metrics(ranks, preds, labels, n_classes=3, ks=(1, 2))
    assert out["top1"] == pytest.approx(3 / 5) and out["top2"] == 1.0
    assert out["per_class_recall"] == [0.5, 0.0, 1.0] and out["support"] == [2, 1, 2]
    assert out["mean_per_class_recall"] == pytest.approx(0.5)
    assert out["confusion"].tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 2]]
    unseen = classification_metrics(ranks[:2], preds[:2], labels[:2], n_classes=3)
    assert unseen["per_class_recall"] == [0.5, None, None] and unseen["mean_per_class_recall"] == 0.5


def test_zero_shot_classifier_averages_normalised_templates() -> None:
    names = ["cat", "dog"]

    def encode_text(texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            base = torch.tensor([1.0, 0.0]) if "cat" in t else torch.tensor([0.0, 1.0])
            scale = 5.0 if t.startswith("a photo") else 1.0  # normalisation must remove this
            extra = torch.tensor([1.0]) if t.startswith("a photo") else torch.tensor([0.0])
            out.append(torch.cat([base * scale, extra * scale]))
        return torch.stack(out)

    emb = zero_shot_classifier(names, encode_text, templates=["a {}", "a photo of a {}"], batch_size=3)
    assert emb.shape == (2, 3)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    # mean of [1,0,0] and [1,0,1]/sqrt2, re-normalised
    expected = torch.tensor([1 + 1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)])
    assert torch.allclose(emb[0], expected / expected.norm(), atol=1e-6)
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(names, encode_text, templates=["no placeholder"])


# ----------------------------------------------------------------------------- captions (pycocoevalcap)


def test_bleu_identical_is_one() -> None:
    assert bleu4(["a cat left of a dog"], [["a cat left of a dog"]]) == pytest.approx(1.0, rel=1e-6)


def test_bleu_hand_computed() -> None:
    # p1 = 5/6 (second "the" clipped), p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths -> bp = 1
    score = bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert score == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)


def test_bleu_brevity_penalty_closest_reference_and_clipping() -> None:
    # all precisions 1; the closest reference has 6 words against 4 -> bp = exp(1 - 6/4)
    out = caption_scores(["the cat sat on"], [["the cat sat on the mat", "the cat sat on the mat today again"]],
                         metrics=("bleu",))
    assert out["bleu1"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert out["bleu4"] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert bleu4(["the cat sat on the mat"], [["the cat sat on"]]) < 1.0  # a longer candidate: precision falls
    # "the" x4 against max 2 in one reference -> p1 = 2/4; no 2-gram beyond "the the" -> tiny BLEU-4
    clipped = caption_scores(["the the the the"], [["the cat", "the the"]], metrics=("bleu",))
    assert clipped["bleu1"] == pytest.approx(0.5, rel=1e-6) and clipped["bleu4"] < 1e-3


def test_bleu_and_cider_match_coco_caption() -> None:
    # reference values from coco-caption's scorers (pycocoevalcap 1.2 Bleu(4)[3] and Cider), the
    # figures the hand-written versions of these metrics were checked against before
    cands = ["a cat left of a dog", "a pizza above a doughnut", "a red apple", "a bridge at night below a cat"]
    refs = [
        ["a cat left of a dog", "a dog right of a cat"],
        ["a doughnut below a pizza"],
        ["a green apple", "an apple"],
        ["a bridge at night below a cat face"],
    ]
    assert bleu4(cands, refs) == pytest.approx(0.74492948869427, rel=1e-8)
    assert cider_d(cands, refs) == pytest.approx(4.985058222795319, rel=1e-9)
    per = caption_scores(cands, refs, metrics=("cider_d",), per_item=True)["per_item"]["cider_d"]
    assert per == pytest.approx([6.52714932, 3.31125139, 1.24137945, 8.86045273], rel=1e-7)


def test_cider_hand_computed_cases() -> None:
    # idf("a") = log2 - log2 = 0; unigram and bigram cosines are 1, 3-/4-grams empty -> 10 * 2/4
    assert cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)
    per = caption_scores(["a dog", "a dog"], [["a cat"], ["a dog"]], metrics=("cider_d",), per_item=True)
    assert per["per_item"]["cider_d"] == pytest.approx([0.0, 5.0])
    # cand "a cat sat" vs ref "a cat": 1-gram and 2-gram cosines 1/sqrt2, 3-gram 0, length diff 1
    per = caption_scores(["a cat sat", "a dog"], [["a cat"], ["a dog"]], metrics=("cider_d",), per_item=True)
    assert per["per_item"]["cider_d"][0] == pytest.approx(10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72))
    assert cider_d(["a cat"], [["a cat"]]) == 0.0  # one item: every idf is 0


def test_caption_metrics_validate_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        bleu4(["a"], [["a"], ["b"]])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        cider_d(["a"], ["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="metrics: expected some of"):
        caption_scores(["a"], [["a"]], metrics=("bleu", "spice"))
    with pytest.raises(ValueError, match="tokenizer: expected 'auto', 'ptb' or 'simple'"):
        caption_scores(["a"], [["a"]], tokenizer="nltk")
    assert tokenize_caption("A Cat, left-of THE dog!") == ["a", "cat", "left-of", "the", "dog"]


def test_simple_tokenizer_matches_ptb_on_ordinary_captions() -> None:
    texts = ["A dog's toy, isn't it?", "Two men (in a boat).", "He said: \"hi\" -- twice...", "A T-shirt; 3.5 cm!"]
    simple = [simple_ptb_tokenize(t) for t in texts]
    assert simple == ["a dog 's toy is n't it", "two men -lrb- in a boat -rrb-", "he said hi twice", "a t-shirt 3.5 cm"]
    if shutil.which("java"):
        assert ptb_tokenize(texts) == simple


def test_without_java_meteor_is_absent_and_tokenisation_is_simple(monkeypatch) -> None:
    import mammut.eval.caption_metrics as cm

    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    out = caption_scores(["A red apple."], [["a red apple", "an apple"]])
    assert out["tokenizer"] == "simple" and out["meteor"] is None
    assert out["absent"] == {"meteor": "java is not on PATH"}
    assert out["bleu1"] == pytest.approx(1.0, rel=1e-6) and out["rouge_l"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tokenizer: 'ptb' needs java on PATH"):
        caption_scores(["a"], [["a"]], tokenizer="ptb")


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR runs the METEOR 1.5 jar: needs java")
def test_meteor_with_java() -> None:
    out = caption_scores(["a red apple", "a dog", "a green car"], [["a red apple"], ["a cat", "one dog"], ["a boat"]],
                         metrics=("meteor",), per_item=True)
    assert out["tokenizer"] == "ptb" and out["absent"] == {}
    exact, partial, wrong = out["per_item"]["meteor"]
    assert exact == pytest.approx(1.0, abs=0.07)  # METEOR's fragmentation penalty keeps it under 1
    assert exact > partial > wrong >= 0.0 and 0.0 < out["meteor"] < 1.0


# ----------------------------------------------------------------------------- emoji names


def test_emoji_name_accuracy() -> None:
    caps = ["a cat face above a pizza", "a pizza", "a doughnut left of a dog", "a cat face"]
    names = [["cat face", "pizza"], ["doughnut"], ["doughnut", "bridge at night"], ["cat"]]
    out = emoji_name_accuracy(caps, names)
    assert out["acc_2"] == pytest.approx(0.5) and out["n_2"] == 2
    # without a vocabulary "cat" is credited by "cat face"
    assert out["acc_1"] == pytest.approx(0.5) and out["acc"] == pytest.approx(0.5)
    strict = emoji_name_accuracy(caps, names, vocabulary=["cat", "cat face", "pizza", "doughnut", "dog"])
    assert strict["acc_1"] == 0.0 and strict["acc_2"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal length"):
        emoji_name_accuracy(caps, names[:2])


def test_nan_or_inf_embeddings_are_rejected_not_scored_as_hits() -> None:
    # without the check every comparison with NaN is False: pessimistic rank 0, a "perfect" score
    img, txt = torch.full((4, 8), float("nan")), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"image_embeds: expected finite embeddings, got 4 of 4 rows with NaN or inf"):
        retrieval_recall(img, txt)
    txt[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"text_embeds: expected finite embeddings, got 1 of 4 rows"):
        retrieval_recall(torch.randn(4, 8), txt, normalize=False)
    cls = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"image_embeds: expected finite .* 4 of 4 rows"):
        zero_shot_accuracy(img, cls, [0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"image_embeds: expected finite .* 4 of 4 rows"):
        zero_shot_predictions(img, cls, [0, 1, 2, 0])
    cls[2] = float("nan")
    with pytest.raises(ValueError, match=r"class_embeds: expected finite .* 1 of 3 rows"):
        zero_shot_predictions(torch.randn(4, 8), cls, [0, 1, 2, 0])

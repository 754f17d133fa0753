"""Evaluation metrics on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mammut.eval.metrics import (
    bleu4,
    cider_d,
    cider_d_per_item,
    corpus_bleu,
    emoji_name_accuracy,
    retrieval_recall,
    tokenize_caption,
    zero_shot_accuracy,
    zero_shot_classifier,
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


# ----------------------------------------------------------------------------- BLEU


def test_bleu_identical_is_one() -> None:
    assert bleu4(["a cat left of a dog"], [["a cat left of a dog"]]) == pytest.approx(1.0)


def test_bleu_hand_computed() -> None:
    # p1 = 5/6 (second "the" clipped), p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths -> bp = 1
    score = bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert score == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_brevity_penalty_and_closest_reference() -> None:
    # all precisions 1; closest reference has 6 words vs 4 -> bp = exp(1 - 6/4)
    out = corpus_bleu(["the cat sat on"], [["the cat sat on the mat", "the cat sat on the mat today again"]])
    assert out["p1"] == out["p4"] == 1.0
    assert out["bleu"] == pytest.approx(math.exp(-0.5))
    # a longer candidate is not penalised
    assert bleu4(["the cat sat on the mat"], [["the cat sat on"]]) < 1.0
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on"]])["bp"] == 1.0


def test_bleu_clipping_and_zero() -> None:
    out = corpus_bleu(["the the the the"], [["the cat", "the the"]])
    assert out["p1"] == pytest.approx(2 / 4)  # clipped to the max count in any one reference
    assert out["bleu"] == 0.0  # no 3-gram matches


def test_bleu_and_cider_match_coco_caption() -> None:
    # reference values from coco-caption's scorers (pycocoevalcap 1.2 Bleu(4)[3] and Cider)
    cands = ["a cat left of a dog", "a pizza above a doughnut", "a red apple", "a bridge at night below a cat"]
    refs = [
        ["a cat left of a dog", "a dog right of a cat"],
        ["a doughnut below a pizza"],
        ["a green apple", "an apple"],
        ["a bridge at night below a cat face"],
    ]
    assert bleu4(cands, refs) == pytest.approx(0.74492948869427, rel=1e-8)
    assert cider_d(cands, refs) == pytest.approx(4.985058222795319, rel=1e-9)
    per = cider_d_per_item(cands, refs)
    assert per == pytest.approx([6.52714932, 3.31125139, 1.24137945, 8.86045273], rel=1e-7)


# ----------------------------------------------------------------------------- CIDEr-D


def test_cider_identical_two_word_captions() -> None:
    # idf("a") = log2 - log2 = 0; unigram and bigram cosines are 1, 3-/4-grams empty -> 10 * 2/4
    assert cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)


def test_cider_wrong_object_scores_zero() -> None:
    assert cider_d_per_item(["a dog", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx([0.0, 5.0])


def test_cider_length_penalty_hand_computed() -> None:
    # cand "a cat sat" vs ref "a cat": 1-gram and 2-gram cosines 1/sqrt2, 3-gram 0, length diff 1
    per = cider_d_per_item(["a cat sat", "a dog"], [["a cat"], ["a dog"]])
    expected = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per[0] == pytest.approx(expected)


def test_cider_single_item_corpus_is_zero() -> None:
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


def test_caption_metrics_validate_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        bleu4(["a"], [["a"], ["b"]])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        cider_d(["a"], ["a"])  # type: ignore[list-item]
    assert tokenize_caption("A Cat, left-of THE dog!") == ["a", "cat", "left-of", "the", "dog"]


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

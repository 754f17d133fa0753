"""``mammut eval zeroshot --scoring generative``: classes scored by the captioner's
log-probability of their prompts, checked against a plain loop over (image, prompt) pairs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mammut.eval.metrics import score_predictions
from mammut.eval.model_source import EvalModel
from mammut.eval.zeroshot import caption_scores, evaluate_zeroshot
from mammut.models import get_model_spec


class Words:
    """Whitespace words -> ids 3.. (0 pad, 1 bos, 2 eos)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, words):
        self.ids = {w: i + 3 for i, w in enumerate(words)}

    def __call__(self, texts, context_length=None):
        rows = [[1, *[self.ids[w] for w in t.split()], 2] for t in texts]
        out = torch.zeros(len(rows), context_length or max(map(len, rows)), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out


WORDS = ["red", "green", "blue", "a", "square", "of", "colour"]


def _model(seed=0):
    torch.manual_seed(seed)
    spec = get_model_spec("mammut")
    return spec.build_tiny().eval()


def _em(model):
    size = model.image_size
    pre = lambda im: torch.tensor(list(im.convert("RGB").resize((size, size)).getdata()), dtype=torch.float32  # noqa: E731
                                  ).view(size, size, 3).permute(2, 0, 1) / 255
    return EvalModel(model, pre, Words(WORDS), "tiny", torch.device("cpu"), False)


@torch.no_grad()
def _reference(model, images, prompts):
    """Per image and class: mean over prompts of sum_t log p(token t | image, tokens < t)."""
    out = torch.zeros(len(images), len(prompts))
    for i in range(len(images)):
        for k, ps in enumerate(prompts):
            vals = []
            for p in ps:
                text = torch.tensor([p])
                logp = model(text, images[i:i + 1])[0].float().log_softmax(-1)
                vals.append(sum(float(logp[t - 1, p[t]]) for t in range(1, len(p))))
            out[i, k] = sum(vals) / len(vals)
    return out


def test_caption_scores_equal_a_plain_loop_over_images_and_prompts():
    model = _model()
    em = _em(model)
    images = torch.rand(3, 3, model.image_size, model.image_size)
    prompts = [em.prompt_ids(["a red square", "red colour"]), em.prompt_ids(["a green square of colour"]),
               em.prompt_ids(["blue"])]
    assert prompts[2] == [[1, 5]]  # start token + word, no end token, no padding
    got = caption_scores(em, images, prompts, max_rows=4)  # several decoder calls
    assert torch.allclose(got, _reference(model, images, prompts), atol=1e-4)


def test_generative_zeroshot_predicts_the_best_scored_class(tmp_path):
    model = _model(1)
    em = _em(model)
    data = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for c, colour in enumerate(["blue", "green", "red"]):
        (data / colour).mkdir(parents=True)
        for j in range(3):
            arr = (torch.rand(12, 12, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(arr).save(data / colour / f"{j}.png")
    metrics, sections, _ = evaluate_zeroshot(em, data, tmp_path / "out", templates="a {} square", progress=False,
                                             scoring="generative", batch_size=4)
    assert metrics["scoring"] == "generative" and metrics["n_images"] == 9 and "| scoring | generative |" in sections[0]
    from mammut.data.formats import read_image_folder

    folder = read_image_folder(data)
    images = torch.stack([em.preprocess(Image.open(p)) for p in folder.paths])
    ref = _reference(model, images, [em.prompt_ids([f"a {c} square"]) for c in folder.classes])
    _, preds = score_predictions(ref, torch.tensor(folder.labels))
    assert metrics["top1"] == pytest.approx(float((preds == torch.tensor(folder.labels)).float().mean()))


def test_generative_scoring_needs_a_captioner_that_reads_image_tokens(tmp_path):
    em = _em(_model())
    em.model = torch.nn.Linear(2, 2)  # neither MaMMUT nor CoCa
    with pytest.raises(ValueError, match="--scoring generative: expected a model with a captioner"):
        evaluate_zeroshot(em, tmp_path, tmp_path / "out", scoring="generative")
    with pytest.raises(ValueError, match=r"--scoring: expected one of \['contrastive', 'generative'\], got 'x'"):
        evaluate_zeroshot(em, tmp_path, tmp_path / "out", scoring="x")


def test_score_predictions_rank_ties_against_the_truth_and_refuses_nan():
    ranks, preds = score_predictions(torch.tensor([[0.0, 1.0, 1.0], [2.0, 1.0, 0.0]]), torch.tensor([1, 0]))
    assert ranks.tolist() == [1, 0] and preds.tolist() == [2, 0]
    with pytest.raises(ValueError, match="NaN"):
        score_predictions(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))

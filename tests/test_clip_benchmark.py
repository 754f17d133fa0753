"""CLIP_benchmark evaluates a mammut model unchanged, through its Python API, with the
``(model, preprocess, tokenizer)`` of ``mammut.load``; its numbers equal those of mammut's own
evaluation functions on the same generated images (coloured shapes drawn here).

The model is the registry's tiny MaMMUT with random weights: accuracies near chance, so beside
the headline metrics the test compares clip_benchmark's class embeddings, logits and
retrieval scores with ours tensor by tensor, which would differ for any mistake in
tokenisation, preprocessing, normalisation or pooling.

clip-benchmark 1.6.2 (the newest) computes top-k accuracy with ``float(<1-element array>)``,
which NumPy >= 2.4 refuses; where it does, :func:`numpy_safe_accuracy` (the same top-k count,
on tensors) stands in for that one helper. Everything the model and tokenizer meet is
clip_benchmark's own code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import mammut
from mammut.data.tokenizer import train_bpe
from mammut.eval.metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from mammut.inference import embed_images, embed_texts

zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 20)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ["a photo of a {c} shape.", "a {c} thing", "something {c} on grey"]


def draw(colour: str, shape: str, seed: int) -> Image.Image:
    """A shape of one colour on a grey background, at a size and place drawn from ``seed``; a
    few image sizes and aspect ratios, so the preprocessing resizes and crops."""
    g = torch.Generator().manual_seed(seed)
    w, h = [(48, 48), (64, 40), (37, 55)][seed % 3]
    img = Image.new("RGB", (w, h), (128, 128, 128))
    r = int(torch.randint(8, min(w, h) // 2, (1,), generator=g))
    cx, cy = int(torch.randint(r, w - r + 1, (1,), generator=g)), int(torch.randint(r, h - r + 1, (1,), generator=g))
    pen = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


class ColourShapes(torch.utils.data.Dataset):
    """Classification (label = colour, ``.classes`` as torchvision datasets) or retrieval (two
    captions per image) items, images through ``preprocess``."""

    def __init__(self, preprocess, retrieval: bool = False) -> None:
        self.preprocess, self.retrieval = preprocess, retrieval
        self.classes = list(COLOURS)
        self.items = [(c, s, i) for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        colour, shape, seed = self.items[i]
        image = self.preprocess(draw(colour, shape, seed))
        if self.retrieval:
            return image, [f"a {colour} {shape}", f"a {shape} painted {colour}, number {seed}"]
        return image, self.classes.index(colour)


def numpy_safe_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Share of rows whose target is among the ``k`` highest logits, for each ``k``."""
    hits = output.topk(max(topk), dim=1).indices == target[:, None]
    return [hits[:, :k].any(dim=1).float().sum().item() / len(target) for k in topk]


@pytest.fixture(autouse=True)
def _accuracy_under_numpy_2_4(monkeypatch):
    try:
        zsc.accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
    except TypeError:  # clip-benchmark 1.6.2 with NumPy >= 2.4: only 0-dimensional arrays convert to scalars
        monkeypatch.setattr(zsc, "accuracy", numpy_safe_accuracy)


def captions_collate(batch):
    """clip_benchmark's retrieval batches: stacked images, a list of caption lists."""
    images, texts = zip(*batch)
    return torch.stack(images), list(texts)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The tiny MaMMUT (random weights), a BPE on the captions, saved and read back by mammut.load."""
    spec = mammut.models.get_model_spec("mammut")
    torch.manual_seed(0)
    words = [f"{t.format(c=c)}" for t in TEMPLATES for c in COLOURS] + [f"a {s} painted {c}, number {i}"
                                                                      for c in COLOURS for s in SHAPES for i in range(20)]
    tok = train_bpe(words * 3, vocab_size=spec.tiny["num_tokens"])
    tok.context_length = 16
    model = mammut.create_model("mammut", **spec.tiny)
    folder = tmp_path_factory.mktemp("tiny") / "tiny"
    preprocess = mammut.ImagePreprocess(spec.tiny["vit"]["image_size"], mean=mammut.CLIP_MEAN, std=mammut.CLIP_STD)
    model.save_pretrained(folder, preprocess=preprocess, tokenizer=tok)
    return mammut.load(folder)


def test_zero_shot_classification_equals_mammuts(loaded):
    model, preprocess, tokenizer = loaded
    data = ColourShapes(preprocess)
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # 18 images: the last batch is short
    classnames = data.classes
    theirs = zsc.evaluate(model, loader, tokenizer, classnames, TEMPLATES, "cpu", amp=False)

    # mammut's side: its own batched embedding (tokenizer.encode, embed_image / embed_text) and metrics
    classifier = zero_shot_classifier(classnames, lambda texts: embed_texts(model, tokenizer, texts, 16, truncate=True),
                                      [t.replace("{c}", "{}") for t in TEMPLATES])
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    image_embeds = embed_images(model, images)
    # the tensors clip_benchmark builds are ours
    their_classifier = zsc.zero_shot_classifier(model, tokenizer, classnames, TEMPLATES, "cpu", amp=False)
    torch.testing.assert_close(their_classifier.T, classifier, atol=1e-6, rtol=1e-5)
    logits, target = zsc.run_classification(model, their_classifier, loader, "cpu", amp=False)
    ours = 100.0 * F.normalize(image_embeds, dim=-1) @ classifier.T
    torch.testing.assert_close(logits, ours, atol=1e-4, rtol=1e-5)
    assert torch.equal(target, labels)
    assert len(set(logits.argmax(1).tolist())) > 1  # not a constant prediction: the comparison means something
    # and so are its metrics
    # (mammut's metrics are float32 means, clip_benchmark's Python floats: equal counts, 1e-6 apart)
    assert theirs["acc1"] == pytest.approx(zero_shot_accuracy(image_embeds, classifier, labels, k=1), abs=1e-6)
    assert theirs["acc5"] == pytest.approx(zero_shot_accuracy(image_embeds, classifier, labels, k=5), abs=1e-6)
    assert theirs["acc1"] < theirs["acc5"]
    pred = ours.argmax(1)
    recall = [(pred[labels == c] == c).float().mean().item() for c in range(len(classnames))]
    assert theirs["mean_per_class_recall"] == pytest.approx(sum(recall) / len(recall), abs=1e-12)


def test_zero_shot_retrieval_equals_mammuts(loaded):
    model, preprocess, tokenizer = loaded
    data = ColourShapes(preprocess, retrieval=True)
    loader = torch.utils.data.DataLoader(data, batch_size=5, collate_fn=captions_collate)
    theirs = zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])

    texts = [t for i in range(len(data)) for t in data[i][1]]
    text_to_image = [i for i in range(len(data)) for _ in data[i][1]]
    image_embeds = embed_images(model, torch.stack([data[i][0] for i in range(len(data))]), batch_size=7)
    text_embeds = embed_texts(model, tokenizer, texts, 16, truncate=True)
    ours = retrieval_recall(image_embeds, text_embeds, ks=(1, 5), text_to_image=text_to_image)
    assert 0 < ours["t2i_R@5"] < 1 or 0 < ours["i2t_R@5"] < 1  # a model that ranks, not a degenerate one
    for k in (1, 5):  # clip_benchmark: image_retrieval = text -> image, text_retrieval = image -> text
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"t2i_R@{k}"], abs=1e-6)
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"i2t_R@{k}"], abs=1e-6)


def test_mixed_precision_runs_as_clip_benchmark_asks(loaded):
    """``amp=True`` (clip_benchmark's default): CPU autocast to bfloat16 through our model."""
    model, preprocess, tokenizer = loaded
    data = ColourShapes(preprocess)
    loader = torch.utils.data.DataLoader(data, batch_size=6)
    out = zsc.evaluate(model, loader, tokenizer, data.classes, TEMPLATES, "cpu", amp=True)
    assert 0.0 <= out["acc1"] <= out["acc5"] <= 1.0 and 0.0 <= out["mean_per_class_recall"] <= 1.0

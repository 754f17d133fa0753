"""Zero-shot evaluation throughput: images/s of ``mammut eval zeroshot``'s evaluation
(``mammut.eval.zeroshot.evaluate_zeroshot``) against the same evaluation written with open_clip
3.3.0 (its eval transform, ``encode_image``), on one ViT-B/32-size model, in one run, as a ratio.

    .venv/bin/python benchmarks/zeroshot.py [--threads 2] [--images 96] [--batch 32] [--repeats 3] [--workers 0]

Model: open_clip's ``coca_ViT-B-32`` with random weights (``open_clip.create_model``, fp32,
eval mode), and the same weights converted with ``mammut.convert.open_clip.coca_from_open_clip``
with the preprocessing and tokenizer ``mammut.load`` gives such a file (open_clip's eval
transform as ``ImagePreprocess.open_clip(224)``, ``CLIPTokenizer``). The script first checks
that the two embed a batch alike (cosine > 0.999 for every image; it exits with an error
otherwise).

Measured, each side alternating for ``--repeats`` rounds after a warm-up round (medians):
1. model only: ``embed_image`` vs open_clip's ``encode_image(normalize=True)`` on one batch of
   ``--batch`` tensors (``benchmarks/_timing.py``);
2. the whole image pass of a zero-shot evaluation over an ImageFolder of ``--images`` JPEGs
   (10 classes, 320 x 240, so every image is resized and cropped): reading and decoding the
   files, preprocessing, batching, embedding, on ``--workers`` decoding processes. Ours:
   ``evaluate_zeroshot`` (its ``images_per_s``: the image loop, class prompts excluded);
   open_clip's: a DataLoader over torchvision's ``ImageFolder`` with open_clip's eval transform,
   ``encode_image`` and the logits against the class embeddings, timed the same way.
Ratios (ours / open_clip's images/s) are what hold on a shared machine; absolute figures move
with load. Both sides also report top-1 on the (random) labels: equal when they agree.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import interleaved  # benchmarks/_timing.py (the script's own folder is on sys.path)

CLASSES = ("apple", "boat", "car", "dog", "fish", "house", "kite", "lamp", "moon", "tree")
TEMPLATE = "a photo of a {}."


def make_folder(root: Path, n: int) -> Path:
    """``n`` JPEGs of coloured shapes in 10 class folders."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name = CLASSES[i % len(CLASSES)]
        (root / name).mkdir(parents=True, exist_ok=True)
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        img = Image.new("RGB", (320, 240), tuple(255 - c for c in colour))
        x, y = (int(v) for v in torch.randint(20, 160, (2,), generator=g))
        ImageDraw.Draw(img).ellipse((x, y, x + 120, y + 70), fill=colour)
        img.save(root / name / f"{i:04d}.jpg", quality=90)
    return root


def open_clip_pass(model, preprocess, classifier: torch.Tensor, folder: Path, batch: int, workers: int
                   ) -> tuple[float, float]:
    """open_clip's zero-shot image pass: (images/s of the loop, top-1)."""
    from torchvision.datasets import ImageFolder

    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=preprocess), batch_size=batch,
                                         num_workers=workers)
    right = n = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            logits = model.encode_image(images, normalize=True) @ classifier.T
            right += int((logits.argmax(dim=1) == labels).sum())
            n += len(labels)
    return n / (time.perf_counter() - t), right / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import open_clip

    from mammut.convert.clip_tokenizer import CLIPTokenizer
    from mammut.convert.open_clip import coca_from_open_clip
    from mammut.eval.model_source import EvalModel
    from mammut.eval.zeroshot import evaluate_zeroshot
    from mammut.preprocess import ImagePreprocess

    theirs = open_clip.create_model("coca_ViT-B-32").eval()
    their_preprocess = open_clip.image_transform(224, is_train=False)
    ours = coca_from_open_clip("coca_ViT-B-32", copy.deepcopy(theirs.state_dict())).eval()
    em = EvalModel(ours, ImagePreprocess.open_clip(224), CLIPTokenizer(context_length=76), "coca_ViT-B-32 (random)")

    x = torch.rand(args.batch, 3, 224, 224)
    with torch.inference_mode():
        cos = F.cosine_similarity(ours.embed_image(x), theirs.encode_image(x, normalize=True), dim=-1)
        if float(cos.min()) <= 0.999:
            sys.exit(f"zeroshot.py: error: ours and open_clip's image embeddings differ (lowest cosine {float(cos.min()):.6f})")
        print(f"ViT-B/32 CoCa: embeddings agree, lowest cosine {float(cos.min()):.6f} over {len(x)} images")
        model_s = interleaved({"mammut embed_image": lambda: ours.embed_image(x),
                               "open_clip encode_image": lambda: theirs.encode_image(x, normalize=True)},
                              args.repeats)
        tok = open_clip.get_tokenizer("coca_ViT-B-32")
        their_classes = theirs.encode_text(tok([TEMPLATE.format(c) for c in CLASSES]), normalize=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "folder", args.images)
        rates: dict[str, list[float]] = {"mammut evaluate_zeroshot": [], "open_clip loop": []}
        top1 = {}
        for r in range(args.repeats + 1):  # round 0 warms both up and is not counted
            metrics, _, _ = evaluate_zeroshot(em, folder, Path(tmp) / f"out{r}", templates=TEMPLATE,
                                              batch_size=args.batch, workers=args.workers, progress=False,
                                              limit=None if r else args.batch)
            rate, acc = open_clip_pass(theirs, their_preprocess, their_classes, folder, args.batch, args.workers)
            if r:
                rates["mammut evaluate_zeroshot"].append(metrics["images_per_s"])
                rates["open_clip loop"].append(rate)
                top1.update({"mammut evaluate_zeroshot": metrics["top1"], "open_clip loop": acc})

    print(f"threads {args.threads}, fp32, {args.repeats} interleaved rounds (median); open_clip {open_clip.__version__}, "
          f"torch {torch.__version__}")
    print(f"1. model only, batch {args.batch} of 224 px:")
    for name, sec in model_s.items():
        print(f"  {name:28s} {sec * 1e3:8.1f} ms  {args.batch / sec:8.1f} images/s")
    print(f"  mammut / open_clip images/s = {model_s['open_clip encode_image'] / model_s['mammut embed_image']:.2f}")
    print(f"2. zero-shot image pass: {args.images} JPEGs 320x240, {len(CLASSES)} classes, batch {args.batch}, "
          f"{args.workers} workers:")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in med.items():
        print(f"  {name:28s} {rate:8.1f} images/s  top-1 {top1[name]:.3f}")
    print(f"  mammut / open_clip images/s = {med['mammut evaluate_zeroshot'] / med['open_clip loop']:.2f}")


if __name__ == "__main__":
    main()

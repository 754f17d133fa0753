"""Image embedding throughput on CPU: images/s of ``embed_image`` against open_clip 3.3.0's
``encode_image`` on the same converted weights, measured in one run (interleaved rounds,
medians), after checking that the two give the same embeddings (cosine > 0.999 for every
image; the script exits with an error otherwise).

    .venv/bin/python benchmarks/embed.py [--threads 2] [--repeats 5] [--batch-demo 64] [--batch-b32 16]

Models (random init, fp32, ``torch.inference_mode()``, eval mode):
- ``demo``: the ``demo`` preset's MaMMUT (``load_config("demo").model``: ViT 192 x 4, patch 8,
  3 heads x 64, on 64 px images, mean-pooled image embedding). open_clip has no such model, so
  next to it: an open_clip CoCa whose vision tower has the demo's sizes (64 px, patch 8, width
  192, 4 layers, head width 64, attentional pooler), converted with ``CoCa.from_open_clip``:
  ours vs theirs on the same weights.
- ``ViT-B/32``: open_clip's ``coca_ViT-B-32`` (224 px, patch 32, width 768, 12 layers),
  converted with ``CoCa.from_open_clip("coca_ViT-B-32", theirs.state_dict())`` (as
  ``benchmarks/caption_open_clip.py``): ours vs theirs.
Ratios (ours / open_clip images/s) are what hold on a shared machine; absolute figures move
with load.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from _timing import interleaved  # benchmarks/_timing.py (the script's own folder is on sys.path)


def demo_mammut() -> torch.nn.Module:
    from mammut.train.build import build_model
    from mammut.train.config import load_config

    cfg = load_config("demo")
    section = dict(cfg.model)
    section["vit"] = {**section["vit"], "image_size": cfg.data.image_size}
    section.setdefault("num_tokens", cfg.data.vocab_size)
    return build_model(section).eval()


def open_clip_pair(cfg: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(open_clip CoCa, the same weights as a mammut CoCa)."""
    from open_clip.coca_model import CoCa as OpenClipCoCa

    from mammut.models.coca import CoCa

    theirs = OpenClipCoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    return theirs, CoCa.from_open_clip(cfg, theirs.state_dict()).eval()


def demo_sized_open_clip_config() -> dict[str, Any]:
    width, layers, head, vocab = 192, 4, 64, 2048
    text = dict(context_length=20, vocab_size=vocab, width=width, heads=width // head, layers=1, embed_cls=True, output_tokens=True)
    return dict(
        embed_dim=width,
        vision_cfg=dict(image_size=64, patch_size=8, width=width, layers=layers, head_width=head, attentional_pool=True,
                        attn_pooler_heads=width // head, output_tokens=True),
        text_cfg=text,
        multimodal_cfg=dict(context_length=20, vocab_size=vocab, width=width, heads=width // head, layers=1,
                            attn_pooler_heads=width // head),
    )


def check_same(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    cos = F.cosine_similarity(ours.float(), theirs.float(), dim=-1)
    worst = float(cos.min())
    print(f"{name}: embeddings agree, lowest cosine {worst:.6f} over {cos.numel()} images")
    if worst <= 0.999:
        sys.exit(f"embed.py: error: {name}: ours and open_clip's embeddings differ (lowest cosine {worst:.6f} <= 0.999)")
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-demo", type=int, default=64)
    p.add_argument("--batch-b32", type=int, default=16)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import open_clip

    demo = demo_mammut()
    small_theirs, small_ours = open_clip_pair(demo_sized_open_clip_config())
    b32_theirs, b32_ours = open_clip_pair(copy.deepcopy(open_clip.get_model_config("coca_ViT-B-32")))
    x_demo = torch.rand(args.batch_demo, 3, 64, 64)
    x_b32 = torch.rand(args.batch_b32, 3, 224, 224)
    with torch.inference_mode():
        check_same("demo-sized CoCa", small_ours.embed_image(x_demo), small_theirs.encode_image(x_demo, normalize=True))
        check_same("ViT-B/32 CoCa", b32_ours.embed_image(x_b32), b32_theirs.encode_image(x_b32, normalize=True))
        fns = {
            "demo MaMMUT, mammut embed_image": (lambda: demo.embed_image(x_demo), args.batch_demo),
            "demo-sized CoCa, mammut embed_image": (lambda: small_ours.embed_image(x_demo), args.batch_demo),
            "demo-sized CoCa, open_clip encode_image": (lambda: small_theirs.encode_image(x_demo, normalize=True), args.batch_demo),
            "ViT-B/32 CoCa, mammut embed_image": (lambda: b32_ours.embed_image(x_b32), args.batch_b32),
            "ViT-B/32 CoCa, open_clip encode_image": (lambda: b32_theirs.encode_image(x_b32, normalize=True), args.batch_b32),
        }
        times = interleaved({k: fn for k, (fn, _) in fns.items()}, args.repeats)
    print(f"threads {args.threads}, fp32, {args.repeats} interleaved rounds (median); open_clip {open_clip.__version__}, "
          f"torch {torch.__version__}")
    rate = {k: fns[k][1] / sec for k, sec in times.items()}
    for name, sec in times.items():
        print(f"  {name:42s} batch {fns[name][1]:3d}  {sec * 1e3:8.1f} ms  {rate[name]:8.1f} images/s")
    for size in ("demo-sized CoCa", "ViT-B/32 CoCa"):
        ratio = rate[f"{size}, mammut embed_image"] / rate[f"{size}, open_clip encode_image"]
        print(f"  {size}: mammut / open_clip images/s = {ratio:.2f}")


if __name__ == "__main__":
    main()

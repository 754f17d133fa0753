"""Greedy captioning time: open_clip CoCa's own ``generate`` versus the same weights converted to
mammut (``CoCa.from_open_clip``) and run by ``model.generate`` (KV cache, image cross-attention
keys/values projected once), same images, in one run.

Weights: random init of open_clip's ``coca_ViT-B-32`` (nothing is downloaded); ``--layers N``
reduces every tower to N layers. Both sides generate the same number of tokens (random weights
never pick the end token early; open_clip's ``seq_len`` = ``--tokens`` + 1 with its start
token, its eos ban for the first 4 tokens mirrored by ``min_new_tokens=4``) and the captions
are checked to be identical token for token. Also timed: ours without the cache
(``use_cache=False``, every step re-runs the whole prefix, as open_clip does).

Run: ``.venv/bin/python benchmarks/caption_open_clip.py [--threads 2 --batch 4 --tokens 32]``.
Prints ms/caption for each and the ratio open_clip / ours (ratios within one run are what
matter on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch


def build(name: str, layers: int | None):
    import open_clip
    from open_clip.coca_model import CoCa as OpenClipCoCa

    from mammut.models.coca import CoCa

    cfg = copy.deepcopy(open_clip.get_model_config(name))
    if layers is not None:
        for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
            cfg[tower]["layers"] = layers
    theirs = OpenClipCoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    # open_clip 3.3.0 leaves the decoder's vocabulary projection uninitialised (torch.empty)
    proj = theirs.text_decoder.text_projection
    torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    ours = CoCa.from_open_clip(cfg, theirs.state_dict()).eval()
    return theirs, ours


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="coca_ViT-B-32", choices=("coca_ViT-B-32", "coca_ViT-L-14"))
    p.add_argument("--layers", type=int, default=None, help="layers per tower (default: the config's, 12)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per caption")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    theirs, ours = build(args.model, args.layers)
    theirs, ours = theirs.to(args.device), ours.to(args.device)
    size = ours.config.vit["image_size"]
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    seq_len = args.tokens + 1

    def run_open_clip() -> torch.Tensor:
        with torch.no_grad():
            return theirs.generate(images, generation_type="top_k", top_k=1, seq_len=seq_len)

    def run_ours(cache: bool = True) -> torch.Tensor:
        return ours.generate(images, max_new_tokens=args.tokens, min_new_tokens=4, use_cache=cache)

    t_oc, ref = timed(run_open_clip, args.repeats)
    t_ours, new = timed(run_ours, args.repeats)
    t_nocache, _ = timed(lambda: run_ours(False), args.repeats)
    # open_clip forces eos as its last token; compare everything before it
    same = torch.equal(ref[:, 1:-1], new[:, : ref.shape[1] - 2])
    layers = args.layers or ours.config.unimodal_depth
    print(f"{args.model} ({layers} layers per tower, random weights), batch {args.batch}, {args.tokens} new tokens, "
          f"{args.threads} threads, {args.device}, greedy")
    print(f"captions identical token for token: {same}")
    per = 1000.0 / args.batch
    print(f"open_clip generate        : {t_oc * per:8.1f} ms/caption")
    print(f"mammut generate (KV cache): {t_ours * per:8.1f} ms/caption   open_clip / mammut = {t_oc / t_ours:.2f}x")
    print(f"mammut generate (no cache): {t_nocache * per:8.1f} ms/caption   open_clip / mammut = {t_oc / t_nocache:.2f}x")


if __name__ == "__main__":
    main()

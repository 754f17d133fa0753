"""How well does a detection run name the emoji it finds? For the true boxes of held-out emoji
detection scenes, the share whose class ranks first among every class (300 queries) by

- the detector's own token: of the tokens whose predicted box overlaps the true box at IoU >= 0.5,
  the one scoring the box's class highest (none: a miss);
- the frozen pretrained image tower (``model.region_size``) on the true box's crops, pasted at
  the re-scoring's scales (``mammut.eval.detection.Rescore``), embeddings averaged; and the same
  with the scene's other true boxes painted out of each crop (those not covering its centre,
  ``mammut.eval.detection.occluders``: the re-scoring's hiding, with true boxes for proposals),
  also by how much of the box other true boxes cover;

the recall of the re-scoring's proposals (the share of true boxes with a proposal at IoU >= 0.5
among each image's best 10 and 20 tokens after class-agnostic NMS at IoU 0.5, as
``mammut.eval.detection.predict`` picks them); and the geometry of the text queries (effective dimension of the query embeddings, the median
cosine of each to its nearest other query), which bounds how finely the frozen text side can
tell classes apart.

    .venv/bin/python benchmarks/detection_naming.py RUN [--n 200] [--scene-set 0] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--scene-set", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from torchvision.ops import box_convert, box_iou, nms

    from mammut.eval.detection import Rescore, occluders, paste_crops
    from mammut.eval.model_source import load_eval_model
    from mammut.runs import read_run_config
    from mammut.train.config import config_from_dict
    from mammut.train.task import get_task

    em = load_eval_model(args.run, precision="fp32")
    model = em.model
    cfg = config_from_dict(read_run_config(args.run))
    task = get_task("detection")(cfg)
    ds = task.dataset("heldout", task.heldout_seed + args.scene_set)
    names, novel = ds.class_names(), set(ds.novel_ids)
    items = [ds[i] for i in range(args.n)]
    with torch.no_grad():
        q = model.query_embeds(task.queries(em.tokenizer, names)).float()
    labels = torch.tensor([lab for it in items for lab in it["labels"].tolist()])
    is_novel = torch.tensor([lab in novel for lab in labels.tolist()])

    hits, recall = [], {10: [], 20: []}
    with torch.no_grad():
        for s in range(0, len(items), 64):
            chunk = items[s:s + 64]
            out = model.detect(torch.stack([it["image"] for it in chunk]), q)
            boxes = box_convert(out["boxes"].float(), "cxcywh", "xyxy")
            objectness = F.logsigmoid(out["logits"].float()).amax(-1)
            for i, it in enumerate(chunk):
                proposals = boxes[i, nms(boxes[i].clamp(0, 1), objectness[i], 0.5)].clamp(0, 1)
                for box, lab in zip(it["boxes"], it["labels"].tolist()):
                    for k, found in recall.items():
                        found.append(bool((box_iou(proposals[:k], box.view(1, 4).float()) >= 0.5).any()))
                    near = (box_iou(boxes[i], box.view(1, 4).float())[:, 0] >= 0.5).nonzero()[:, 0]
                    if len(near) == 0:
                        hits.append(False)
                        continue
                    token = near[out["logits"][i, near, lab].argmax()]
                    hits.append(int(out["logits"][i, token].argmax()) == lab)
    rows = [("detector's own token (IoU >= 0.5)", torch.tensor(hits))]
    if getattr(model, "region", None) is not None:
        size, scales = model.config.region_size, Rescore().scales
        with torch.no_grad():
            emb = torch.stack([torch.cat([model.region_embeds(paste_crops(it["image"], it["boxes"], size, sc))
                                          for it in items]) for sc in scales]).mean(0)
        rows.append(("frozen pretrained tower, pasted crops", (F.normalize(emb, dim=-1) @ q.t()).argmax(-1) == labels))
        with torch.no_grad():
            hidden = torch.stack([torch.cat([
                model.region_embeds(paste_crops(it["image"], it["boxes"], size, sc,
                                                occluders(it["boxes"], torch.ones(len(it["boxes"])), 0.0, 1.0)))
                for it in items]) for sc in scales]).mean(0)
        rows.append(("the same, other true boxes painted out", (F.normalize(hidden, dim=-1) @ q.t()).argmax(-1) == labels))
    covered = []
    for it in items:  # the share of each true box that the scene's other true boxes cover
        b = it["boxes"].float()
        inter = (torch.min(b[:, None, 2:], b[None, :, 2:]) - torch.max(b[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
        inter.fill_diagonal_(0.0)
        covered.append((inter / (b[:, 2:] - b[:, :2]).prod(-1)[:, None]).amax(1))
    covered = torch.cat(covered)
    print(f"{args.run}: {len(labels)} true boxes of {args.n} held-out scenes (set {args.scene_set}), {len(names)} classes")
    print("| named first by | all | base | novel |")
    print("|---|---|---|---|")
    for name, ok in rows:
        ok = ok.float()
        print(f"| {name} | {ok.mean():.3f} | {ok[~is_novel].mean():.3f} | {ok[is_novel].mean():.3f} |")
    bins = [("none", covered == 0), ("up to 10 %", (covered > 0) & (covered <= 0.1)),
            ("10-30 %", (covered > 0.1) & (covered <= 0.3)), ("over 30 %", covered > 0.3)]
    print("\n| share of the true box covered by other true boxes | boxes | " + " | ".join(n for n, _ in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for label, sel in bins:
        print(f"| {label} | {int(sel.sum())} | " + " | ".join(f"{ok[sel].float().mean():.3f}" if sel.any() else "n/a"
                                                             for _, ok in rows) + " |")
    print("proposals holding a true box (IoU >= 0.5): " + ", ".join(
        f"best {k}: {torch.tensor(v).float().mean():.3f}" for k, v in recall.items()))
    centred = q - q.mean(0)
    share = torch.linalg.svdvals(centred) ** 2
    share = share / share.sum()
    eff = float(torch.exp(-(share * share.clamp_min(1e-12).log()).sum()))
    cos = q @ q.t()
    cos.fill_diagonal_(-1.0)
    print(f"text queries: effective dimension {eff:.1f} of {q.shape[1]}; nearest-other-query cosine, median "
          f"{float(cos.max(1).values.median()):.3f}")


if __name__ == "__main__":
    main()

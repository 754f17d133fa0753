"""Post-processing of a trained detection run, measured on its held-out emoji scenes without any
training: how the (token, class) pairs become COCO detections. Prints one markdown table.

    .venv/bin/python benchmarks/detection_postprocess.py RUN [--n 512] [--threads 1]

The run's detector is applied once (fp32); each row re-ranks the same outputs and is scored by
pycocotools' COCOeval as ``mammut eval RUN`` does (the 100 best pairs per image), from the
sigmoid scores whatever the run's ``task_options.loss_softmax``:
- ``no NMS``: sigmoid scores, OWL-ViT's text path (the evaluation before per-class NMS);
- ``per-class NMS at IoU t``: ``torchvision.ops.batched_nms`` per class (t = 0.5: the default);
- ``+ prompt ensemble``: each class's query the mean of the embeddings of five templates
  (CLIP / OWL-ViT's prompt ensembling; the pretraining captions read ``a {name} ...``);
- ``+ sigmoid x softmax``: each score times the token's softmax over the 300 queries of its logits;
- ``one class per token``: only each token's best class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATES = ("a {}", "{}", "an emoji of a {}", "a {} emoji", "a photo of a {}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a detection run folder (train.task: detection, emoji data)")
    p.add_argument("--n", type=int, default=512, help="held-out scenes scored (default 512)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch
    import torch.nn.functional as F
    from torchvision.ops import batched_nms, box_convert

    import mammut
    from mammut.eval.detection import coco_ap, emoji_ground_truth, to_coco_results
    from mammut.runs import read_run_config
    from mammut.train.config import config_from_dict
    from mammut.train.task import get_task

    torch.set_num_threads(args.threads)
    cfg = config_from_dict(read_run_config(Path(args.run)))
    task = get_task("detection")(cfg)
    if task._closed():
        raise SystemExit("run: expected an open-vocabulary detection run (text queries), got a closed-vocabulary one")
    ds = task.dataset("heldout", task.heldout_seed)
    names, base, novel = ds.class_names(), list(ds.base_ids), list(ds.novel_ids)
    items = task.heldout(args.n)
    model, _, tokenizer = mammut.load(args.run)
    model.eval()
    with torch.no_grad():
        images = torch.stack([it["image"] for it in items])
        tokens = model.grid_tokens(images)
        boxes = model.predict_boxes(tokens)
        embeds = model.token_class_embeds(tokens, boxes)
        queries = {t: model.query_embeds(tokenizer([t.format(n) for n in names], cfg.data.max_len)) for t in TEMPLATES}
        logits = {t: model.score(tokens, embeds, q) for t, q in queries.items()}
        ensemble = model.score(tokens, embeds, F.normalize(torch.stack(list(queries.values())).mean(0), dim=-1))
    xyxy = box_convert(boxes, "cxcywh", "xyxy").clamp(0, 1)
    size = cfg.data.image_size
    truth = emoji_ground_truth(items, names, size)

    def scored(log_scores: torch.Tensor, nms: float | None) -> dict:
        dets = []
        nq = log_scores.shape[-1]
        for i in range(len(items)):
            top = log_scores[i].flatten().topk(100 if nms is None else 1000)
            token, label = top.indices // nq, top.indices % nq
            keep = torch.isfinite(top.values)
            box, value, lab = xyxy[i, token[keep]], top.values[keep], label[keep]
            if nms is not None:
                kept = batched_nms(box, value, lab, nms)[:100]
                box, value, lab = box[kept], value[kept], lab[kept]
            dets.append({"boxes": box, "scores": value.exp(), "labels": lab})
        results = to_coco_results([it["image_id"] for it in items], dets, list(range(len(names))), [size] * len(items))
        return coco_ap(truth, results, base, novel)

    plain = F.logsigmoid(logits["a {}"])
    best = logits["a {}"].argmax(-1, keepdim=True)
    one_class = torch.full_like(plain, float("-inf")).scatter(-1, best, plain.gather(-1, best))
    rows = [("no NMS (before)", plain, None)]
    rows += [(f"per-class NMS at IoU {t}", plain, t) for t in (0.3, 0.5, 0.7)]
    rows += [("NMS 0.5 + prompt ensemble (5 templates)", F.logsigmoid(ensemble), 0.5),
             ("NMS 0.5 + sigmoid x softmax over the queries", plain + F.log_softmax(logits["a {}"], -1), 0.5),
             ("NMS 0.5, one class per token", one_class, 0.5)]
    print(f"{args.run}: {args.n} held-out scenes, {len(base)} base and {len(novel)} novel classes\n")
    print("| post-processing | AP | AP50 | AP75 | base AP50 | novel AP50 | novel AP |")
    print("|---|---|---|---|---|---|---|")
    for name, log_scores, nms in rows:
        ap = scored(log_scores, nms)
        print(f"| {name} | {ap['all']['AP']:.3f} | {ap['all']['AP50']:.3f} | {ap['all']['AP75']:.3f} | "
              f"{ap['base']['AP50']:.3f} | {ap['novel']['AP50']:.3f} | {ap['novel']['AP']:.3f} |")


if __name__ == "__main__":
    main()

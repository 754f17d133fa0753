"""Re-scoring detections with a frozen copy of the pretrained image tower (issue 25): the crops,
the copy (filled from the pretraining run, never trained), the ensemble of detector and region
scores (F-VLM), and a detection run that evaluates with it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mammut.eval.detection import Rescore, occluders, paste_crops, predict, vote_boxes
from mammut.models import get_model_spec
from mammut.models.detector import MaMMUTDetector

pytest.importorskip("scipy")
pytest.importorskip("pycocotools")


def detector_with_region(region_size: int = 16) -> MaMMUTDetector:
    tiny = get_model_spec("mammut_detector").build_tiny()
    torch.manual_seed(0)
    return MaMMUTDetector(dataclasses.replace(tiny.config, region_size=region_size)).eval()


def test_a_crop_is_pasted_at_its_scale_in_the_middle_of_the_images_border_colour():
    image = torch.zeros(3, 40, 40)
    image[2] = 1.0  # blue background
    image[:, 10:20, 4:24] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # a red 20 x 10 object
    box = torch.tensor([[4 / 40, 10 / 40, 24 / 40, 20 / 40]])
    crop = paste_crops(image, box, 32, 0.5)
    assert crop.shape == (1, 3, 32, 32)
    red = (crop[0, 0] > 0.9) & (crop[0, 2] < 0.1)
    rows, cols = red.any(1).nonzero()[:, 0], red.any(0).nonzero()[:, 0]
    assert (cols.min(), cols.max() + 1) == (8, 24) and (rows.min(), rows.max() + 1) == (12, 20)  # 16 x 8, centred
    torch.testing.assert_close(crop[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))  # the border colour around it
    # a box of no width still gives a crop (one pixel), never an error
    assert paste_crops(image, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 32, 0.5).shape == (1, 3, 32, 32)


def test_other_objects_are_painted_out_of_a_crop_but_not_a_looser_box_of_the_same_object():
    boxes = torch.tensor([[0.10, 0.10, 0.50, 0.50],    # 0: the object named
                          [0.40, 0.40, 0.80, 0.80],    # 1: another object overlapping its corner
                          [0.05, 0.05, 0.55, 0.55],    # 2: a looser box of object 0 (covers its centre)
                          [0.45, 0.05, 0.70, 0.30],    # 3: another object, scored too low
                          [0.20, 0.20, 0.60, 0.60]])   # 4: overlapping 0 at IoU 0.6 (> max_iou)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.05, 0.9])
    hide = occluders(boxes, scores, 0.15, 0.3)
    assert hide[0] == [1] and 0 not in hide[0]
    assert occluders(boxes, scores, 0.0, 0.3)[0] == [1, 3]
    assert occluders(boxes, scores, 0.15, 1.0)[0] == [1]  # box 4 covers object 0's centre: never painted out
    image = torch.ones(3, 40, 40)
    image[:, 4:20, 4:20] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)   # red object 0
    image[:, 16:32, 16:32] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)  # green object 1 on top of its corner
    two = torch.tensor([[4 / 40, 4 / 40, 20 / 40, 20 / 40], [16 / 40, 16 / 40, 32 / 40, 32 / 40]])
    green = lambda crop: int(((crop[1] > 0.9) & (crop[0] < 0.1)).sum())  # noqa: E731
    plain, hidden = paste_crops(image, two, 32, 0.5), paste_crops(image, two, 32, 0.5, hide=[[1], []])
    assert green(plain[0]) > 0 and green(hidden[0]) == 0   # object 1's pixels painted the border colour (white)
    assert int((hidden[0, 0] > 0.9).sum()) > 0 and torch.equal(hidden[1], plain[1])


def test_box_voting_averages_the_overlapping_token_boxes_by_score(two_on_one):
    boxes = torch.tensor([[0.10, 0.10, 0.50, 0.50], [0.70, 0.70, 0.90, 0.90]])
    tokens = torch.tensor([[0.10, 0.10, 0.50, 0.50],    # IoU 1 with box 0
                           [0.14, 0.14, 0.54, 0.54],    # IoU 0.67
                           [0.30, 0.30, 0.70, 0.70],    # IoU 0.14: below 0.3, not counted
                           [0.72, 0.72, 0.92, 0.92]])   # only near box 1, weight 0
    weights = torch.tensor([1.0, 3.0, 5.0, 0.0])
    voted = vote_boxes(boxes, tokens, weights, 0.3)
    torch.testing.assert_close(voted[0], (1.0 * tokens[0] + 3.0 * tokens[1]) / 4.0)
    torch.testing.assert_close(voted[1], boxes[1])  # its only overlapping token weighs 0: kept as it was
    assert vote_boxes(boxes[:0], tokens, weights, 0.3).shape == (0, 4)
    # predict votes each detection over the image's tokens, weighted by their best sigmoid score squared
    from torchvision.ops import box_convert

    det = detector_with_region(16)
    images, queries = torch.rand(2, 3, 32, 32), torch.randint(3, 300, (5, 4))
    plain = predict(det, images, queries, rescore=None, nms=None, box_vote=None)
    voted = predict(det, images, queries, rescore=None, nms=None, box_vote=0.3)
    with torch.no_grad():
        out = det.detect(images, det.query_embeds(queries))
    for i in range(2):
        tok = box_convert(out["boxes"][i].float(), "cxcywh", "xyxy").clamp(0, 1)
        w = torch.sigmoid(out["logits"][i].float()).amax(-1) ** 2
        torch.testing.assert_close(voted[i]["boxes"], vote_boxes(plain[i]["boxes"], tok, w, 0.3), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(voted[i]["scores"], plain[i]["scores"])
    with pytest.raises(ValueError, match="box_vote"):
        predict(det, images, queries, box_vote=1.5)
    # two tokens box one object (IoU 0.82): the kept box moves to their mean weighted by score^2, the far token's stays
    fixed = two_on_one()
    own = predict(fixed, images[:1], torch.rand(2, 4), nms=0.5, box_vote=None)[0]
    moved = predict(fixed, images[:1], torch.rand(2, 4), nms=0.5)[0]  # default box_vote 0.3
    s0, s1 = torch.sigmoid(torch.tensor(3.0)) ** 2, torch.sigmoid(torch.tensor(2.0)) ** 2
    token_boxes = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.21, 0.2, 0.41, 0.4], [0.6, 0.6, 0.8, 0.8]])
    mean = (s0 * token_boxes[0] + s1 * token_boxes[1]) / (s0 + s1)
    for d, expect in ((own, token_boxes[0]), (moved, mean)):
        first = d["boxes"][(d["labels"] == 0).nonzero()[0, 0]]  # class 0's best: token 0 (token 1 suppressed)
        torch.testing.assert_close(first, expect)
        torch.testing.assert_close(d["boxes"][(d["labels"] == 1).nonzero()[0, 0]], token_boxes[2])


def test_rescore_settings_are_checked_naming_the_field():
    for kwargs, field in (({"proposals": 0}, "proposals"), ({"alpha_seen": 1.5}, "alpha_seen"),
                          ({"alpha_unseen": -0.1}, "alpha_unseen"), ({"scales": ()}, "scales"),
                          ({"proposal_nms": 0.0}, "proposal_nms"), ({"hide_others": 1.5}, "hide_others"),
                          ({"hide_iou": -0.1}, "hide_iou")):
        with pytest.raises(ValueError, match=field):
            Rescore(**kwargs)


def test_the_region_tower_is_frozen_and_embeds_a_crop_as_the_source_embeds_a_whole_image():
    from mammut.models.detector import REGION_KEYS

    det = detector_with_region(16)
    assert all(not p.requires_grad for p in det.region.parameters())
    assert all(p.requires_grad for n, p in det.named_parameters() if not n.startswith("region."))
    source = get_model_spec("mammut").build_tiny(vit=dict(image_size=16, patch_size=8, dim=64, depth=2, heads=2,
                                                           dim_head=32)).eval()
    state = det.state_dict()
    for k, v in source.state_dict().items():
        for a, b in REGION_KEYS.items():
            if k.startswith(a):
                state[b + k[len(a):]] = v
    det.load_state_dict(state)
    crops = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(det.region_embeds(crops), source.embed_image(crops))
    det.train()
    assert not det.region.training  # a frozen copy stays in eval mode
    with pytest.raises(ValueError, match=r"crops: expected \(k, 3, 16, 16\)"):
        det.region_embeds(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="region_size: expected 0"):
        dataclasses.replace(det.config, region_size=-1)


def test_rescored_scores_are_the_geometric_ensemble_of_detector_and_region_scores():
    det = detector_with_region(16)
    images, queries = torch.rand(2, 3, 32, 32), torch.randint(3, 300, (5, 4))
    with torch.no_grad():
        out = det.detect(images, queries)
        q = det.query_embeds(queries)
    # alpha 0: the detector's own sigmoid scores, on the proposals only (at most proposals x queries pairs)
    only_det = predict(det, images, queries, rescore=Rescore(proposals=3, alpha_seen=0.0, alpha_unseen=0.0, scales=(0.5, 0.75)),
                       nms=None, box_vote=None)
    for i, d in enumerate(only_det):
        assert 0 < len(d["labels"]) <= 3 * 5
        token = torch.cdist(d["boxes"], torch.cat([out["boxes"][i, :, :2] - out["boxes"][i, :, 2:] / 2,
                                                   out["boxes"][i, :, :2] + out["boxes"][i, :, 2:] / 2], -1).clamp(0, 1)
                            ).argmin(-1)
        torch.testing.assert_close(d["scores"], torch.sigmoid(out["logits"][i, token, d["labels"]]), atol=1e-5, rtol=1e-4)
    # alpha 1: the region tower's softmax over the queries of each proposal's crops (mean embedding over the scales)
    opt = Rescore(proposals=3, alpha_seen=1.0, alpha_unseen=1.0, scales=(0.5, 0.75), hide_others=None)
    only_region = predict(det, images, queries, rescore=opt, nms=None, box_vote=None)
    tau = float(det.contrastive.logit_scale().detach())
    for i, d in enumerate(only_region):
        with torch.no_grad():
            emb = torch.stack([det.region_embeds(paste_crops(images[i], d["boxes"], 16, s)) for s in opt.scales]).mean(0)
        expect = F.softmax(tau * F.normalize(emb, dim=-1) @ q.t(), -1).gather(1, d["labels"][:, None])[:, 0]
        torch.testing.assert_close(d["scores"], expect, atol=1e-5, rtol=1e-4)
    # classes left out (allowed) are never predicted, whatever the weights
    for a in (0.0, 1.0):
        kept = predict(det, images, queries, rescore=Rescore(proposals=3, alpha_seen=a, alpha_unseen=a), allowed=[0, 2])
        assert all(set(d["labels"].tolist()) <= {0, 2} and len(d["labels"]) and torch.isfinite(d["scores"]).all()
                   for d in kept)
    # seen classes take alpha_seen, the others alpha_unseen
    mixed = predict(det, images, queries, rescore=Rescore(proposals=3, alpha_seen=0.0, alpha_unseen=1.0, scales=(0.5, 0.75)),
                    seen=[0, 1], nms=None, box_vote=None)
    for a, b, m in zip(only_det, only_region, mixed):
        for box, label, score in zip(m["boxes"], m["labels"], m["scores"]):
            ref = a if int(label) in (0, 1) else b
            hit = ((ref["boxes"] - box).abs().sum(-1) < 1e-6) & (ref["labels"] == label)
            torch.testing.assert_close(score, ref["scores"][hit][0])


def test_each_crop_hides_the_other_proposals_the_detector_scores_highly(monkeypatch):
    import mammut.eval.detection as D
    from torchvision.ops import box_convert, nms

    det = detector_with_region(16)
    images, queries = torch.rand(2, 3, 32, 32), torch.randint(3, 300, (5, 4))
    seen: list = []
    real = D.paste_crops
    monkeypatch.setattr(D, "paste_crops", lambda image, boxes, size, scale, hide=None: (
        seen.append((boxes.clone(), hide)), real(image, boxes, size, scale, hide))[1])
    opt = Rescore(proposals=4, scales=(0.5,), hide_others=0.0, hide_iou=0.9)
    predict(det, images, queries, rescore=opt)
    with torch.no_grad():
        out = det.detect(images, det.query_embeds(queries))
    assert len(seen) == 2
    for i, (boxes, hide) in enumerate(seen):
        b = box_convert(out["boxes"][i].float(), "cxcywh", "xyxy").clamp(0, 1)
        score = torch.sigmoid(out["logits"][i].float()).amax(-1)
        keep = nms(b, score, opt.proposal_nms)[:opt.proposals]
        torch.testing.assert_close(boxes, b[keep])
        assert hide == occluders(b[keep], score[keep], 0.0, 0.9)
    seen.clear()
    predict(det, images, queries, rescore=dataclasses.replace(opt, hide_others=None))
    assert [h for _, h in seen] == [None, None]


def test_rescoring_needs_text_queries_and_a_region_tower():
    plain = get_model_spec("mammut_detector").build_tiny().eval()
    images, queries = torch.rand(1, 3, 32, 32), torch.randint(3, 300, (2, 4))
    with pytest.raises(ValueError, match="rescore: this detector keeps no pretrained image tower"):
        predict(plain, images, queries, rescore=Rescore())
    assert len(predict(plain, images, queries)) == 1  # "auto": nothing to re-score with, the detector's own scores
    closed = MaMMUTDetector(dataclasses.replace(plain.config, region_size=16, num_classes=3)).eval()
    with pytest.raises(ValueError, match="rescore: expected text queries"):
        predict(closed, images, None, rescore=Rescore())
    assert len(predict(closed, images, None)) == 1  # "auto" leaves the learned classes alone
    with pytest.raises(ValueError, match="rescore: expected a Rescore"):
        predict(plain, images, queries, rescore="yes")


def test_a_detection_run_copies_the_pretrained_tower_keeps_it_and_evaluates_with_it(tmp_path):
    from mammut.cli import main
    from mammut.eval.evaluate import evaluate_run
    from mammut.models.detector import REGION_KEYS
    from mammut.train.checkpointing import load_weights
    from mammut.train.config import ConfigError, load_config
    from mammut.train.loop import Trainer

    pre, det = tmp_path / "pre", tmp_path / "det"
    Trainer(load_config("tiny", ["--train.out_dir", str(pre), "--train.steps", "2", "--train.progress", "false"])).fit()
    Trainer(load_config("detection-tiny", ["--train.out_dir", str(det), "--train.init_from", str(pre), "--train.steps",
                                           "4", "--model.region_size", "32", "--train.progress", "false"])).fit()
    src = load_weights(sorted((pre / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    out = load_weights(sorted((det / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    compared = 0
    for key, value in src.items():
        for a, b in REGION_KEYS.items():
            if key.startswith(a):
                torch.testing.assert_close(out[b + key[len(a):]], value)  # copied at the pretraining size, never trained
                compared += 1
    assert compared >= 10 and out["img_encoder.pos_emb"].shape != src["img_encoder.pos_emb"].shape  # 48 px detector
    metrics, _ = evaluate_run(det, out_dir=tmp_path / "report", n=8)
    assert metrics["detection"]["rescore"] == {"proposals": 10, "alpha_base": 0.35, "alpha_novel": 0.65,
                                               "scales": [0.375, 0.4375, 0.5], "hide_others": 0.15}
    assert metrics["detection"]["box_vote"] == 0.3
    assert "re-scored by the frozen pretrained image tower" in (tmp_path / "report" / "report.md").read_text()
    for flag, rescored in ((["--rescore-proposals", "3"], True), (["--rescore-proposals", "0"], False)):
        out = tmp_path / f"bench{flag[1]}"
        assert main(["eval", "detection", str(det), "--n", "4", "--out", str(out), "--no-progress", *flag]) == 0
        assert json.loads((out / "metrics.json").read_text())["rescored"] is rescored
    assert main(["eval", "detection", str(det), "--rescore-proposals", "-1"]) == 2
    other = tmp_path / "set1"
    assert main(["eval", "detection", str(det), "--n", "4", "--scene-set", "1", "--out", str(other), "--no-progress"]) == 0
    m = json.loads((other / "metrics.json").read_text())
    assert m["scene_set"] == 1 and m["n_images"] == 4
    assert main(["eval", "detection", str(det), "--scene-set", "-1"]) == 2
    # mammut eval detection weighs as the run's own evaluation: its task_options.rescore_alpha
    import yaml

    cfg = yaml.safe_load((det / "config.yaml").read_text())
    cfg["task_options"]["rescore_alpha"] = [0.2, 0.9]
    cfg["task_options"]["rescore_hide_others"] = None
    (det / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", "detection", str(det), "--n", "4", "--out", str(tmp_path / "alpha"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "alpha" / "metrics.json").read_text())["rescore"]
    assert (m["alpha_seen"], m["alpha_unseen"], m["proposals"], m["hide_others"]) == (0.2, 0.9, 10, None)
    with pytest.raises(ValueError, match="task_options.rescore_hide_others"):
        load_config("detection-tiny", ["--task_options.rescore_hide_others", "2"])
    with pytest.raises(ValueError, match="task_options.box_vote"):
        load_config("detection-tiny", ["--task_options.box_vote", "2"])
    assert main(["eval", "detection", str(det), "--box-vote", "2"]) == 2
    assert main(["eval", "detection", str(det), "--n", "4", "--box-vote", "0", "--out", str(tmp_path / "novote"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "novote" / "metrics.json").read_text())["box_vote"] is None
    with pytest.raises(ConfigError, match="model.region_size"):
        Trainer(load_config("detection-tiny", ["--train.out_dir", str(tmp_path / "scratch"), "--model.region_size", "32",
                                               "--train.progress", "false"])).fit()

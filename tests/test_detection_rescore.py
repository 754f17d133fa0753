"""Re-scoring detections with a frozen copy of the pretrained image tower (issue 25): the crops,
the copy (filled from the pretraining run, never trained), the ensemble of detector and region
scores (F-VLM), and a detection run that evaluates with it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mammut.eval.detection import Rescore, paste_crops, predict
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


def test_rescore_settings_are_checked_naming_the_field():
    for kwargs, field in (({"proposals": 0}, "proposals"), ({"alpha_seen": 1.5}, "alpha_seen"),
                          ({"alpha_unseen": -0.1}, "alpha_unseen"), ({"scales": ()}, "scales"),
                          ({"proposal_nms": 0.0}, "proposal_nms")):
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
                       nms=None)
    for i, d in enumerate(only_det):
        assert 0 < len(d["labels"]) <= 3 * 5
        token = torch.cdist(d["boxes"], torch.cat([out["boxes"][i, :, :2] - out["boxes"][i, :, 2:] / 2,
                                                   out["boxes"][i, :, :2] + out["boxes"][i, :, 2:] / 2], -1).clamp(0, 1)
                            ).argmin(-1)
        torch.testing.assert_close(d["scores"], torch.sigmoid(out["logits"][i, token, d["labels"]]), atol=1e-5, rtol=1e-4)
    # alpha 1: the region tower's softmax over the queries of each proposal's crops (mean embedding over the scales)
    opt = Rescore(proposals=3, alpha_seen=1.0, alpha_unseen=1.0, scales=(0.5, 0.75))
    only_region = predict(det, images, queries, rescore=opt, nms=None)
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
                    seen=[0, 1], nms=None)
    for a, b, m in zip(only_det, only_region, mixed):
        for box, label, score in zip(m["boxes"], m["labels"], m["scores"]):
            ref = a if int(label) in (0, 1) else b
            hit = ((ref["boxes"] - box).abs().sum(-1) < 1e-6) & (ref["labels"] == label)
            torch.testing.assert_close(score, ref["scores"][hit][0])


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
                                               "scales": [0.375, 0.4375, 0.5]}
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
    (det / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", "detection", str(det), "--n", "4", "--out", str(tmp_path / "alpha"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "alpha" / "metrics.json").read_text())["rescore"]
    assert (m["alpha_seen"], m["alpha_unseen"], m["proposals"]) == (0.2, 0.9, 10)
    with pytest.raises(ConfigError, match="model.region_size"):
        Trainer(load_config("detection-tiny", ["--train.out_dir", str(tmp_path / "scratch"), "--model.region_size", "32",
                                               "--train.progress", "false"])).fit()

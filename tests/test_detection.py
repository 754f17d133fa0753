"""Open-vocabulary detection (issue 25): the detector's head, the emoji detection scenes (novel
classes never targets), Hungarian matching and the losses, COCO AP through pycocotools, a
detection run started from a pretraining run (higher resolution, upsampled positions),
``mammut eval detection`` on the held-out scenes and on a COCO instances JSON, ``mammut detect``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mammut.data.detection import CocoInstances, DetectionScenes, letterbox
from mammut.models import get_model_spec
from mammut.models.detector import box_bias

pytest.importorskip("scipy")
pytest.importorskip("pycocotools")

QUIET = ["--train.progress", "false", "--train.report", "false"]


def tiny_detector(**kw):
    return get_model_spec("mammut_detector").build_tiny(**kw)


# ------------------------------------------------------------------------------ the head


def test_boxes_start_at_each_tokens_own_patch_and_logits_score_every_query():
    model = tiny_detector().eval()  # 32 px, patch 8: a 4 x 4 grid
    out = model.detect(torch.rand(2, 3, 32, 32), torch.randint(3, 300, (5, 7)))
    assert out["boxes"].shape == (2, 16, 4) and out["logits"].shape == (2, 16, 5) and out["class_embeds"].shape == (2, 16, 64)
    # the last box layer starts at zero: each token's box is its patch (centre anchor), 1/4 of the side
    token = 4 * 1 + 2  # row 1, column 2
    torch.testing.assert_close(out["boxes"][0, token], torch.tensor([2.5 / 4, 1.5 / 4, 0.25, 0.25]), atol=1e-3, rtol=0)
    assert torch.allclose(out["class_embeds"].norm(dim=-1), torch.ones(2, 16), atol=1e-4)
    # OWL-ViT's corner anchor: (j + 1) / w
    corner = torch.sigmoid(box_bias(4, 4, "corner"))
    torch.testing.assert_close(corner[token, :2], torch.tensor([3 / 4, 2 / 4]), atol=1e-3, rtol=0)


def test_queries_as_embeddings_equal_queries_as_text_and_bad_queries_name_the_argument():
    model = tiny_detector().eval()
    images, text = torch.rand(1, 3, 32, 32), torch.randint(3, 300, (3, 6))
    with torch.no_grad():
        a = model.detect(images, text)["logits"]
        b = model.detect(images, model.embed_text(text))["logits"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="queries: expected embeddings"):
        model.detect(images, torch.rand(3, 5))
    with pytest.raises(ValueError, match="num_classes=0"):
        model.detect(images, None)
    closed = tiny_detector(num_classes=7).eval()
    assert closed.detect(images)["logits"].shape == (1, 16, 7)
    with pytest.raises(ValueError, match="class_pool: expected"):
        tiny_detector(class_pool="roi")


def test_box_pooling_averages_the_tokens_inside_the_box():
    model = tiny_detector()
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5]] + [[0.9, 0.9, 0.01, 0.01]] * 15])  # token 0: the top-left 2x2 patches
    w = model.pool_weights(boxes)
    assert w.shape == (1, 16, 16)
    torch.testing.assert_close(w[0, 0].nonzero().flatten(), torch.tensor([0, 1, 4, 5]))
    assert torch.allclose(w[0, 0, [0, 1, 4, 5]], torch.full((4,), 0.25))
    assert w[0, 3].nonzero().flatten().tolist() == [3]  # no patch centre inside: the token alone


def test_exemplar_query_finds_the_same_object():
    model = tiny_detector().eval()
    images = torch.rand(2, 3, 32, 32)
    emb = model.exemplar_embeds(images, torch.tensor([[0.0, 0.0, 0.25, 0.25]] * 2))
    assert emb.shape == (2, 64)
    assert model.detect(images, emb[:1])["logits"].shape == (2, 16, 1)
    with pytest.raises(ValueError, match="boxes: expected"):
        model.exemplar_embeds(images, torch.rand(3, 4))


# ------------------------------------------------------------------------------ data


def test_novel_emoji_are_never_training_targets_and_held_out_scenes_label_them():
    bg = DetectionScenes(64, 50, split="train", max_objects=4, novel_in_train="background")
    novel = set(bg.novel_ids)
    assert len(novel) == 10 and not novel & set(bg.base_ids) and all(i % 5 == 4 for i in novel)
    scenes = [bg.scene(i) for i in range(300)]
    assert not any(set(s.labels.tolist()) & novel for s in scenes)
    assert sum(len(s.background) for s in scenes) > 50  # novel emoji drawn, unlabelled
    assert all(set(s.background) <= novel for s in scenes)
    absent = DetectionScenes(64, 50, split="train", max_objects=4, novel_in_train="absent")
    assert all(not absent.scene(i).background and not set(absent.scene(i).labels.tolist()) & novel for i in range(100))
    held = DetectionScenes(64, 50, split="heldout", max_objects=4)
    labels = [l for i in range(200) for l in held[i]["labels"].tolist()]
    assert set(labels) & novel and set(labels) & set(held.base_ids)
    # deterministic, boxes normalised and inside the image, several sizes and some overlap
    a, b = held[7], DetectionScenes(64, 50, split="heldout", max_objects=4)[7]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    boxes = torch.cat([held[i]["boxes"] for i in range(200)])
    assert boxes.min() >= 0 and boxes.max() <= 1 and (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes[:, 2] - boxes[:, 0]).std() > 0.03


def test_detection_scenes_use_the_pretraining_vocabulary_and_check_their_settings():
    from mammut.data.scenes import EmojiScenes

    assert DetectionScenes(64, 40, vocab_seed=3).class_names() == EmojiScenes(64, 40, vocab_seed=3).class_names()
    with pytest.raises(ValueError, match="novel_in_train: expected"):
        DetectionScenes(64, 40, novel_in_train="hidden")
    with pytest.raises(ValueError, match="size_range: expected"):
        DetectionScenes(64, 40, size_range=(0.5, 0.2))


# ------------------------------------------------------------------------------ matching, losses, AP


def test_matching_pairs_each_target_with_the_token_predicting_it():
    from mammut.tasks.detection import match

    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.3, 0.3, 0.2]])  # cxcywh
    logits = torch.zeros(3, 4)
    target_boxes = torch.tensor([[0.65, 0.2, 0.95, 0.4], [0.4, 0.4, 0.6, 0.6]])  # = tokens 2 and 0 (xyxy)
    rows, cols = match(logits, boxes, target_boxes, torch.tensor([1, 3]))
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def _fixed_batch(n=4):
    ds = DetectionScenes(32, 20, split="train", max_objects=2, size_range=(0.3, 0.5), novel_in_train="absent")
    items = [ds[i] for i in range(n)]
    base = {c: j for j, c in enumerate(ds.base_ids)}
    return (torch.stack([it["image"] for it in items]), [it["boxes"] for it in items],
            [torch.tensor([base[int(v)] for v in it["labels"]]) for it in items], ds)


def test_losses_fall_on_a_fixed_batch():
    from mammut.tasks.detection import DetectionOptions, detection_losses

    torch.manual_seed(0)
    model = tiny_detector(num_classes=16).train()
    images, boxes, labels, _ = _fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        losses = detection_losses(model.detect(images), boxes, labels, DetectionOptions())
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["giou"] < history[0]["giou"] and history[-1]["l1"] < history[0]["l1"]


def test_coco_ap_is_one_for_the_truth_and_zero_for_a_group_never_predicted():
    from mammut.eval.detection import coco_ap, emoji_ground_truth, to_coco_results

    held = DetectionScenes(64, 20, split="heldout", max_objects=3)
    items = [held[i] for i in range(40)]
    names, base, novel = held.class_names(), list(held.base_ids), list(held.novel_ids)
    gt = emoji_ground_truth(items, names, 64)
    perfect = [{"boxes": it["boxes"], "scores": torch.ones(len(it["labels"])), "labels": it["labels"]} for it in items]
    ap = coco_ap(gt, to_coco_results([it["image_id"] for it in items], perfect, list(range(20)), [64] * 40), base, novel)
    assert ap["all"]["AP"] == pytest.approx(1.0) and ap["novel"]["AP50"] == pytest.approx(1.0)
    assert ap["base"]["AP75"] == pytest.approx(1.0) and ap["n_boxes"] == sum(len(it["labels"]) for it in items)
    base_only = [{k: v[torch.tensor([int(l) in set(base) for l in d["labels"]], dtype=torch.bool)] for k, v in d.items()}
                 for d in perfect]
    ap = coco_ap(gt, to_coco_results([it["image_id"] for it in items], base_only, list(range(20)), [64] * 40), base, novel)
    assert ap["base"]["AP50"] == pytest.approx(1.0) and ap["novel"]["AP50"] == 0.0
    shifted = [{**d, "boxes": (d["boxes"] + 0.3).clamp(max=1)} for d in perfect]
    ap = coco_ap(gt, to_coco_results([it["image_id"] for it in items], shifted, list(range(20)), [64] * 40), base, novel)
    assert ap["all"]["AP50"] < 0.2


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step tiny pretraining run and a detection run started from it at 48 px (64 s budget)."""
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("det")
    pre, det = tmp / "pre", tmp / "det"
    Trainer(load_config("tiny", ["--train.out_dir", str(pre), "--train.steps", "2", "--train.progress", "false"])).fit()
    cfg = load_config("detection-tiny", ["--train.out_dir", str(det), "--train.init_from", str(pre), "--train.steps", "6",
                                         "--train.progress", "false"])
    trainer = Trainer(cfg)
    trainer.fit()
    return pre, det, trainer


def test_a_detection_run_starts_from_a_pretraining_run_at_a_higher_resolution(runs):
    import mammut
    from mammut.encoders.vit import resample_pos_grid
    from mammut.train.checkpointing import load_weights
    from mammut.train.config import load_config

    pre, det, trainer = runs
    saved = load_config(det / "config.yaml").model
    source = load_config(pre / "config.yaml").model
    assert saved["name"] == "mammut_detector" and saved["vit"]["image_size"] == 48 and source["vit"]["image_size"] == 32
    assert {k: v for k, v in saved.items() if k in source and k not in ("name", "vit")} == \
           {k: v for k, v in source.items() if k not in ("name", "vit")}
    # the pretrained weights, the positional grid upsampled 4x4 -> 6x6 (not trained further: compare the start)
    from mammut.train.build import build_model

    fresh = build_model(trainer.model_cfg)
    state, prefixes = trainer.task.adapt_init_state(load_weights(sorted((pre / "checkpoints").glob("step_*"))[-1]
                                                                 / "model.safetensors"), fresh)
    assert prefixes == ("head.",) and state["img_encoder.pos_emb"].shape == (1, 64, 6, 6)
    src = load_weights(sorted((pre / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    torch.testing.assert_close(state["img_encoder.pos_emb"], resample_pos_grid(src["img_encoder.pos_emb"], (6, 6)))
    # mammut.load rebuilds the detector from the run's config
    model, preprocess, tokenizer = mammut.load(det)
    assert type(model).__name__ == "MaMMUTDetector" and model.image_size == 48
    out = model.detect(torch.rand(1, 3, 48, 48), tokenizer(["a cat"]))
    assert out["logits"].shape == (1, 36, 1)


def test_a_source_that_is_not_a_mammut_is_refused_naming_init_from(runs, tmp_path):
    from mammut.tasks.detection import Detection
    from mammut.train.config import ConfigError, load_config

    cfg = load_config("detection-tiny")
    with pytest.raises(ConfigError, match="train.init_from: the detection task starts from a 'mammut' run"):
        Detection.init_model_section(cfg, cfg.model, {"name": "coca", "vit": {}})
    with pytest.raises(ConfigError, match="task_options.novel_in_train"):
        load_config("detection-tiny", ["--task_options.novel_in_train", "sometimes"])


def test_the_run_evaluates_with_coco_ap_and_draws_boxes(runs, tmp_path):
    from mammut.eval.evaluate import evaluate_run

    _, det, _ = runs
    metrics, report = evaluate_run(det, out_dir=tmp_path / "report", n=16)
    ap = metrics["detection"]
    assert set(ap) >= {"all", "base", "novel"} and ap["n_images"] == 16 and ap["n_detections"] > 0
    assert all(0.0 <= ap[g]["AP50"] <= 1.0 for g in ("all", "base"))
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| novel |" in text and (tmp_path / "report" / "detections.png").stat().st_size > 1000


def test_eval_detection_benchmark_on_held_out_scenes_and_on_a_coco_json(runs, tmp_path):
    from mammut.cli import main

    _, det, _ = runs
    assert main(["eval", "detection", str(det), "--n", "8", "--out", str(tmp_path / "emoji"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "emoji" / "metrics.json").read_text())
    assert m["n_images"] == 8 and "novel_AP50" in m and (tmp_path / "emoji" / "detections.png").is_file()

    data = _coco_folder(tmp_path / "coco")
    assert main(["eval", "detection", str(det), "--data", str(data / "instances.json"), "--images", str(data / "img"),
                 "--novel", "cat", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["n_images"] == 3 and m["detection"]["novel"]["n_classes"] == 1 and m["novel_classes"] == ["cat"]
    assert m["skipped"] == {"total": 1, "corrupt": 1}  # the unreadable image: skipped and counted


def _coco_folder(root: Path) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True)
    for i, (w, h) in enumerate([(64, 48), (40, 80), (50, 50)]):
        Image.new("RGB", (w, h), (200, 30 * i, 90)).save(root / "img" / f"{i}.png")
    (root / "img" / "3.png").write_bytes(b"not a png")
    data = {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": 1, "height": 1} for i in range(4)],
            "categories": [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 9, "name": "car"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20]},
                            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [0, 10, 30, 30]},
                            {"id": 3, "image_id": 3, "category_id": 9, "bbox": [10, 10, 5, 5], "iscrowd": 0},
                            {"id": 4, "image_id": 3, "category_id": 99, "bbox": [1, 1, 2, 2]}]}  # unknown: skipped
    (root / "instances.json").write_text(json.dumps(data))
    return root


def test_coco_instances_letterbox_boxes_and_name_bad_arguments(tmp_path):
    root = _coco_folder(tmp_path)
    ds = CocoInstances(root / "instances.json", root / "img", novel=["cat"], image_size=32)
    assert ds.class_names() == ["dog", "cat", "car"] and ds.novel_ids == (1,) and ds.skipped_annotations == 1
    item = ds[1]  # 40 x 80: padded to 80 x 80, cat box [0, 10, 30, 30] -> / 80
    assert item["image"].shape == (3, 32, 32) and item["scale"] == 80
    torch.testing.assert_close(item["boxes"], torch.tensor([[0.0, 10 / 80, 30 / 80, 40 / 80]]))
    assert torch.allclose(item["image"][:, -1, -1], torch.full((3,), 0.5), atol=0.02)  # grey padding
    with pytest.raises(ValueError, match=r"--novel: expected category names .* got \['horse'\]"):
        CocoInstances(root / "instances.json", root / "img", novel=["horse"])
    with pytest.raises(FileNotFoundError, match="--data: no such file"):
        CocoInstances(root / "missing.json")
    (root / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="expected a COCO instances JSON"):
        CocoInstances(root / "bad.json")
    image, side, (h, w) = letterbox(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (10, 20)), 8)
    assert image.shape == (3, 8, 8) and side == 20 and (h, w) == (20, 10)


def test_detect_command_writes_the_image_with_boxes_and_a_json(runs, tmp_path, capsys, two_on_one):
    from PIL import Image

    from mammut.cli import main

    _, det, _ = runs
    img = tmp_path / "scene.png"
    Image.fromarray((DetectionScenes(48, 20)[0]["image"].permute(1, 2, 0) * 255).byte().numpy()).save(img)
    assert main(["detect", str(img), "--run", str(det), "--queries", "a cat, a red car", "--threshold", "0",
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "scene.detections.json").read_text())
    assert result["queries"] == ["a cat", "a red car"] and 0 < len(result["detections"]) <= 20
    assert all(0 <= v <= 48 for d in result["detections"] for v in d["box"])
    assert (tmp_path / "out" / "scene.detections.png").is_file() and "scene.png: " in capsys.readouterr().out
    assert main(["detect", str(img), "--run", str(det), "--queries", " , "]) == 2
    assert "mammut detect: error: --queries: expected comma-separated" in capsys.readouterr().err
    assert main(["detect", str(img), "--run", str(det), "--queries", "a cat", "--box-vote", "1.5"]) == 2
    assert "mammut detect: error: --box-vote: expected an IoU in (0, 1]" in capsys.readouterr().err
    # box voting: each kept box is the score-weighted mean of the token boxes overlapping it (None: the token's own)
    from mammut.apps.detect import detect_image

    square = Image.new("RGB", (100, 100), (200, 200, 200))
    own = detect_image(two_on_one(), lambda q: torch.zeros(len(q), 1), square, ["a", "b"], threshold=0.5, box_vote=None)
    voted = detect_image(two_on_one(), lambda q: torch.zeros(len(q), 1), square, ["a", "b"], threshold=0.5)  # default 0.3
    assert [(d["query"], d["score"]) for d in own] == [(d["query"], d["score"]) for d in voted]
    first = [d for d in own if d["query"] == "a"][0]["box"], [d for d in voted if d["query"] == "a"][0]["box"]
    assert first[0] == [20.0, 20.0, 40.0, 40.0]  # token 0's own box, in pixels of the 100 px image
    w0, w1 = torch.sigmoid(torch.tensor(3.0)) ** 2, torch.sigmoid(torch.tensor(2.0)) ** 2  # best scores, squared
    x0 = float((w0 * 0.2 + w1 * 0.21) / (w0 + w1) * 100)  # token 1 (x0 0.21) pulls token 0's box right
    assert first[1] == [round(x0, 1), 20.0, round(x0 + 20.0, 1), 40.0] and round(x0, 1) == 20.5


def test_a_run_trains_on_a_coco_json_skipping_unreadable_images_and_novel_boxes(runs, tmp_path, caplog):
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    pre, _, _ = runs
    data = _coco_folder(tmp_path / "coco")
    cfg = load_config("detection-tiny", ["--train.out_dir", str(tmp_path / "run"), "--train.init_from", str(pre),
                                         "--data.kind", "coco_detection", "--data.path", str(data / "instances.json"),
                                         "--data.image_root", str(data / "img"), "--task_options.novel", "[cat]",
                                         "--train.steps", "2", "--train.batch_size", "4", "--train.progress", "false"])
    trainer = Trainer(cfg)
    batch = next(trainer.task.train_batches(trainer.tokenizer, rank=0, world_size=1, start_step=0))[0]
    assert batch["queries"].shape[0] == 2  # dog and car: the novel cat is never a query
    assert all(set(lab.tolist()) <= {0, 1} for lab in batch["labels"])  # and never a target
    assert trainer.fit().step == 2
    assert "unreadable, skipped" in caplog.text


def test_losses_split_over_micro_batches_average_to_the_whole_batchs():
    from mammut.tasks.detection import Detection, DetectionOptions, detection_losses
    from mammut.train.config import load_config

    torch.manual_seed(0)
    model = tiny_detector(num_classes=16).eval()
    images, boxes, labels, _ = _fixed_batch(6)
    with torch.no_grad():
        out = model.detect(images)
        whole = detection_losses(out, boxes, labels, DetectionOptions())["loss"]
        micro = [{"labels": labels[:1]}, {"labels": labels[1:]}]  # uneven: 1 image and 5
        Detection(load_config("detection-tiny")).prepare_step(micro, None)
        parts = [detection_losses({k: v[s] for k, v in out.items()}, boxes[s], labels[s], DetectionOptions(),
                                  num_targets=m["num_targets"])["loss"]
                 for m, s in zip(micro, (slice(0, 1), slice(1, 6)))]
    torch.testing.assert_close(torch.stack(parts).mean(), whole)


def test_frozen_query_embeddings_are_computed_once_and_give_the_same_loss(runs):
    _, _, trainer = runs
    task, model = trainer.task, trainer.model.eval()
    batch = next(task.train_batches(trainer.tokenizer, rank=0, world_size=1, start_step=0))[0]
    task._query_cache = {}
    first = task.loss(model, batch)["loss"]
    cached = next(iter(task._query_cache.values()))[1]
    again = task.loss(model, batch)["loss"]
    assert next(iter(task._query_cache.values()))[1] is cached and len(task._query_cache) == 1
    torch.testing.assert_close(again, first)
    with torch.no_grad():
        torch.testing.assert_close(cached, model.query_embeds(batch["queries"]))


# ------------------------------------------------------------------------------ evaluation: per-class NMS


def test_per_class_nms_drops_a_second_box_of_the_same_object_and_class_only(two_on_one):
    from mammut.eval.detection import check_nms, predict
    from mammut.tasks.detection import DetectionOptions

    images, queries = torch.rand(2, 3, 8, 8), torch.rand(2, 4)
    plain = predict(two_on_one(), images, queries, nms=None)[0]  # OWL-ViT's text path: all 6 pairs
    assert len(plain["labels"]) == 6
    kept = predict(two_on_one(), images, queries, box_vote=None)[0]  # default: per-class NMS at IoU 0.5
    pairs = sorted(zip(kept["labels"].tolist(), (kept["boxes"][:, 0] * 100).round().int().tolist()))
    # class 0: token 1 (IoU 0.8 with token 0, lower score) suppressed; class 1: token 0 suppressed by token 1;
    # token 2 (another object) kept for both classes, and token 0 (class 0) beside token 1 (class 1)
    assert pairs == [(0, 20), (0, 60), (1, 21), (1, 60)]
    assert kept["scores"].tolist() == sorted(kept["scores"].tolist(), reverse=True)
    assert len(predict(two_on_one(), images, queries, max_detections=2)[1]["labels"]) == 2
    assert check_nms(1.0) is None and check_nms(0.3) == 0.3
    with pytest.raises(ValueError, match=r"--nms: expected an IoU in \(0, 1\]"):
        check_nms(0.0, "--nms")
    with pytest.raises(ValueError, match="task_options.nms: expected an IoU"):
        DetectionOptions(nms=1.5)


def test_the_softmax_loss_is_the_matched_tokens_cross_entropy_over_the_queries():
    import torch.nn.functional as F

    from mammut.tasks.detection import DetectionOptions, detection_losses

    torch.manual_seed(0)
    model = tiny_detector().eval()
    queries = model.query_embeds(torch.randint(3, 300, (5, 6)))
    with torch.no_grad():
        out = model.detect(torch.rand(1, 3, 32, 32), queries)
    pred = out["boxes"][0, 5]  # a target exactly on token 5's box: matched to it
    target = torch.cat([pred[:2] - pred[2:] / 2, pred[:2] + pred[2:] / 2]).view(1, 4)
    with torch.no_grad():
        losses = detection_losses(out, [target], [torch.tensor([3])], DetectionOptions(loss_softmax=0.5),
                                  queries=queries, softmax_scale=20.0)
        plain = detection_losses(out, [target], [torch.tensor([3])], DetectionOptions())
    expected = F.cross_entropy(20.0 * out["class_embeds"][0, 5:6] @ queries.t(), torch.tensor([3]))
    torch.testing.assert_close(losses["softmax"], expected)
    torch.testing.assert_close(losses["loss"], plain["loss"] + 0.5 * expected)
    assert "softmax" not in plain
    with pytest.raises(ValueError, match="task_options.loss_softmax: expected the queries"):
        detection_losses(out, [target], [torch.tensor([3])], DetectionOptions(loss_softmax=0.5))
    with pytest.raises(ValueError, match="task_options.loss_softmax: expected >= 0"):
        DetectionOptions(loss_softmax=-1.0)


def test_softmax_scoring_multiplies_each_sigmoid_by_the_tokens_softmax_over_the_queries(runs):
    import dataclasses

    import torch.nn.functional as F

    from mammut.eval.detection import predict
    from mammut.tasks.detection import class_softmax

    torch.manual_seed(0)
    model = tiny_detector().eval()
    images, queries = torch.rand(1, 3, 32, 32), model.query_embeds(torch.randint(3, 300, (4, 6)))
    det = predict(model, images, queries, nms=None, max_detections=5, class_softmax=20.0)[0]
    with torch.no_grad():
        out = model.detect(images, queries)
    expected = torch.sigmoid(out["logits"][0]) * F.softmax(20.0 * out["class_embeds"][0] @ queries.t(), dim=-1)
    torch.testing.assert_close(det["scores"], expected.flatten().topk(5).values)
    # the task: the loss gains the softmax term, and evaluation scores with the model's contrastive temperature
    _, _, trainer = runs
    task, model = trainer.task, trainer.model.eval()
    plain = task.opt
    try:
        task.opt = dataclasses.replace(plain, loss_softmax=0.5)
        batch = next(task.train_batches(trainer.tokenizer, rank=0, world_size=1, start_step=0))[0]
        assert "softmax" in task.loss(model, batch)
        scale = float(model.contrastive.logit_scale().detach())
        assert class_softmax(model, task.opt) == pytest.approx(scale)
        metrics, _ = task.evaluate(model, trainer.tokenizer, n=4)
        assert metrics["detection"]["class_softmax"] == pytest.approx(scale)
    finally:
        task.opt = plain
    assert class_softmax(model, plain) is None


def test_scenes_drawn_at_one_size_are_read_at_another_with_the_same_boxes():
    import torch.nn.functional as F

    small = DetectionScenes(48, 20, split="heldout", render_size=None)[3]
    big = DetectionScenes(64, 20, split="heldout", render_size=48)[3]
    assert big["image"].shape == (3, 64, 64)
    torch.testing.assert_close(big["boxes"], small["boxes"])
    assert torch.equal(big["labels"], small["labels"])
    expect = F.interpolate(small["image"][None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(big["image"], expect.clamp(0, 1))
    with pytest.raises(ValueError, match="render_size: expected null or an int >= 16"):
        DetectionScenes(64, 20, render_size=8)

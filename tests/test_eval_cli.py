"""``mammut eval TASK SOURCE ...`` end to end on tiny run folders (a MaMMUT and a VQA-finetuned
FlamingoPaLM, two training steps each) and datasets drawn on the fly; bad input is one line
``mammut eval: error: ...`` and exit code 2; ``mammut eval RUN`` still evaluates a run folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

from mammut.cli import main

RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
QUIET = ["--workers", "0", "--no-progress"]


def _train(out, *extra):
    code = main(["train", "--config", extra[0] if extra else "tiny", "--train.out_dir", str(out), "--train.steps", "2",
                 "--train.threads", "1", "--train.progress", "false", "--train.report", "false", *extra[1:]])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("mammut") / "run")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = []
    for k, (name, rgb) in enumerate(RGB.items()):
        for i in range(2):
            img = Image.new("RGB", (40, 30), (128, 128, 128))
            ImageDraw.Draw(img).ellipse((5, 5, 25, 25), fill=rgb)
            (root / "folder" / name).mkdir(parents=True, exist_ok=True)
            img.save(root / "folder" / name / f"{i}.png")
            img.save(root / f"{name}{i}.jpg")
            images.append({"id": 2 * k + i, "file_name": f"{name}{i}.jpg", "split": "test",
                           "sentences": [{"raw": f"a {name} circle"}, {"raw": f"{name} on grey"}]})
    (root / "folder" / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    karpathy = [{"filename": e["file_name"], "split": "test", "sentences": e["sentences"]} for e in images]
    karpathy.append({"filename": "missing.jpg", "split": "test", "sentences": [{"raw": "gone"}]})
    (root / "karpathy.json").write_text(json.dumps({"images": karpathy}))
    coco = {"images": [{"id": e["id"], "file_name": e["file_name"]} for e in images],
            "annotations": [{"image_id": e["id"], "caption": s["raw"]} for e in images for s in e["sentences"]]}
    (root / "captions.json").write_text(json.dumps(coco))
    (root / "pairs.csv").write_text("filepath,title\n" + "".join(f"{e['file_name']},{s['raw']}\n" for e in images
                                                               for s in e["sentences"]))
    (root / "q.json").write_text(json.dumps({"questions": [
        {"question_id": q, "image_id": e["id"], "question": "what colour is the circle?"}
        for q, e in enumerate(images)]}))
    (root / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": q, "answers": [{"answer": e["file_name"][:-5]}] * 10, "answer_type": "other",
         "question_type": "what colour"} for q, e in enumerate(images)]}))
    for e in images:  # VQA images by id
        (root / "vqa").mkdir(exist_ok=True)
        Image.open(root / e["file_name"]).save(root / "vqa" / f"{e['id']}.jpg")
    return root


def _report(out):
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "report.md").stat().st_size > 0
    return metrics, (out / "report.md").read_text()


def test_zeroshot_cli_bf16(run, data, tmp_path, capsys):
    out = tmp_path / "zs"
    assert main(["eval", "zeroshot", str(run), "--data", str(data / "folder"), "--templates", "a {}",
                 "--out", str(out), "--bf16", *QUIET]) == 0
    metrics, report = _report(out)
    assert metrics["task"] == "zeroshot" and metrics["bf16"] is True and metrics["model_class"] == "MaMMUT"
    assert metrics["n_images"] == 6 and metrics["n_classes"] == 3 and 0 <= metrics["top1"] <= 1
    assert metrics["skipped"]["corrupt"] == 1 and "images skipped: 1 (0 missing, 1 unreadable)" in report
    assert (out / "confusion.png").stat().st_size > 0 and (out / "per_class.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert f"report: {out.resolve()}" in printed and "zeroshot: top1" in printed and "1 images skipped" in printed


@pytest.mark.parametrize("file", ["karpathy.json", "captions.json", "pairs.csv"])
def test_retrieval_cli(run, data, tmp_path, file):
    out = tmp_path / "ret"
    assert main(["eval", "retrieval", str(run), "--data", str(data / file), "--out", str(out), *QUIET]) == 0
    metrics, report = _report(out)
    assert metrics["n_images"] == 6 and metrics["n_texts"] == 12 and metrics["captions_per_image"] == 2
    assert metrics["skipped"]["missing"] == (1 if file == "karpathy.json" else 0)
    assert all(0 <= metrics[f"{d}_R@{k}"] <= 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert metrics["t2i_R@10"] == 1.0  # 6 images: every caption's image is within the top 10
    assert "| image -> text |" in report and (out / "recall_at_k.png").stat().st_size > 0


def test_caption_cli_beam_search_end_to_end(run, data, tmp_path):
    out = tmp_path / "cap"
    assert main(["eval", "caption", str(run), "--data", str(data / "captions.json"), "--out", str(out),
                 "--beams", "2", "--max-new-tokens", "4", "--batch-size", "4", *QUIET]) == 0
    metrics, report = _report(out)
    assert metrics["generation"] == {"max_new_tokens": 4, "strategy": "beam", "num_beams": 2, "length_penalty": 1.0}
    assert metrics["n_images"] == 6 and metrics["references_per_image"] == 2
    assert {"bleu1", "bleu4", "rouge_l", "cider_d", "meteor"} <= set(metrics)
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 6 and all(isinstance(c["caption"], str) for c in captions)
    assert all(len(c["caption"].split()) <= 4 for c in captions)  # at most 4 new tokens
    assert "| CIDEr-D |" in report and (out / "captions.png").stat().st_size > 0


def test_vqa_cli_on_a_vqa_finetuned_flamingo(data, tmp_path):
    run = _train(tmp_path / "flamingo", "vqa-tiny", "--model.name", "flamingo_palm", "--model.depth", "1")
    out = tmp_path / "vqa"
    assert main(["eval", "vqa", str(run), "--questions", str(data / "q.json"), "--annotations", str(data / "a.json"),
                 "--images", str(data / "vqa"), "--out", str(out), "--max-new-tokens", "3", *QUIET]) == 0
    metrics, report = _report(out)
    assert metrics["model_class"] == "FlamingoPaLM" and metrics["n_questions"] == 6
    assert metrics["prompt"].startswith("the run's VQA prompt") and 0 <= metrics["accuracy"] <= 1
    assert set(metrics["per_answer_type"]) == {"other"} and "| other | 6 |" in report
    assert len(json.loads((out / "answers.json").read_text())) == 6
    # a media model captions too: [bos, <image>] as its prompt
    cap = tmp_path / "cap"
    assert main(["eval", "caption", str(run), "--data", str(data / "karpathy.json"), "--out", str(cap),
                 "--max-new-tokens", "3", "--tokenizer", "simple", *QUIET]) == 0
    assert json.loads((cap / "metrics.json").read_text())["n_images"] == 6
    # ... but has no embeddings to classify with
    assert main(["eval", "zeroshot", str(run), "--data", str(data / "folder"), "--out", str(tmp_path / "z"),
                 *QUIET]) == 2


def test_eval_run_folder_still_works(run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["eval", str(run), "--n", "8", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cap = metrics["caption"]
    assert {"bleu1", "bleu4", "meteor", "rouge_l", "cider_d"} <= set(cap) and cap["scorer"] == "pycocoevalcap"
    assert "Scored with pycocoevalcap" in (out / "report.md").read_text()
    assert "held-out retrieval" in capsys.readouterr().out


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mammut eval: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(run, data, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), *QUIET]
    assert "--data: no such file" in _error(capsys, ["eval", "retrieval", str(run), "--data",
                                                     str(tmp_path / "nope.json"), *out])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"annotations": []}))
    assert "--data: expected a Karpathy-split JSON" in _error(capsys, ["eval", "caption", str(run), "--data",
                                                                       str(wrong), *out])
    (tmp_path / "empty").mkdir()
    assert "--data: expected an ImageFolder" in _error(capsys, ["eval", "zeroshot", str(run), "--data",
                                                                str(tmp_path / "empty"), *out])
    assert "no such file or folder" in _error(capsys, ["eval", "zeroshot", str(tmp_path / "no-run"), "--data",
                                                       str(data / "folder"), *out])
    assert "--annotations: expected a VQAv2 annotations file" in _error(
        capsys, ["eval", "vqa", str(run), "--questions", str(data / "q.json"), "--annotations", str(data / "q.json"),
                 "--images", str(data / "vqa"), *out])
    assert "--templates: expected a file of templates" in _error(
        capsys, ["eval", "zeroshot", str(run), "--data", str(data / "folder"), "--templates", "missing.txt", *out])
    mapping = tmp_path / "classes.tsv"
    mapping.write_text("red\tred\nblue\tblue\npurple\tpurple\n")
    assert "--classnames: expected each of the 3 class folders of --data once" in _error(
        capsys, ["eval", "zeroshot", str(run), "--data", str(data / "folder"), "--classnames", str(mapping), *out])
    mapping.write_text("red\tred\nblue\n")
    assert "--classnames: expected every line to be folder<TAB>name or none" in _error(
        capsys, ["eval", "zeroshot", str(run), "--data", str(data / "folder"), "--classnames", str(mapping), *out])
    # checked before the model loads: a missing model is not what the error is about
    assert "--classnames: expected every line" in _error(
        capsys, ["eval", "zeroshot", str(tmp_path / "no-run"), "--data", str(data / "folder"), "--classnames",
                 str(mapping), *out])
    assert "length_penalty" in _error(capsys, ["eval", "caption", str(run), "--data", str(data / "captions.json"),
                                               "--beams", "2", "--length-penalty", "nan", *out])
    assert "--device: expected cpu, cuda or cuda:N, got 'tpu'" in _error(
        capsys, ["eval", "zeroshot", str(run), "--data", str(data / "folder"), "--device", "tpu", *out])
    with pytest.raises(SystemExit) as exc:  # argparse: a missing required option
        main(["eval", "zeroshot", str(run)])
    assert exc.value.code == 2 and "the following arguments are required: --data" in capsys.readouterr().err


def test_an_open_clip_snapshot_scores_as_open_clip_does(data, tmp_path):
    """A local open_clip snapshot (open_clip_config.json + weights) of a small random CoCa:
    ``mammut eval zeroshot`` gives the top-1 of the same evaluation written with open_clip's
    own model, transform and tokenizer; ``mammut eval caption`` decodes with the CLIP BPE."""
    open_clip = pytest.importorskip("open_clip")
    import torch
    from open_clip.coca_model import CoCa

    width, vocab = 32, 49408
    cfg = {"embed_dim": width,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": 16, "patch_size": 8,
                          "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 5,
                          "output_tokens": True},
           "text_cfg": {"context_length": 76, "vocab_size": vocab, "width": width, "heads": 2, "layers": 1,
                        "embed_cls": True, "output_tokens": True},
           "multimodal_cfg": {"context_length": 76, "vocab_size": vocab, "width": width, "heads": 2, "layers": 1,
                              "attn_pooler_heads": 2}}
    torch.manual_seed(1)
    theirs = CoCa(**cfg).eval()
    with torch.no_grad():  # every tensor drawn (open_clip leaves some uninitialised)
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == width else 0.0))
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(theirs.state_dict(), snap / "open_clip_pytorch_model.bin")

    out = tmp_path / "zs"
    assert main(["eval", "zeroshot", str(snap), "--data", str(data / "folder"), "--templates", "a photo of a {}.",
                 "--out", str(out), *QUIET]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_class"] == "CoCa" and metrics["n_images"] == 6

    preprocess = open_clip.image_transform(32, is_train=False)  # open_clip's eval transform, CLIP mean/std
    tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")  # the CLIP BPE at context 76
    names = sorted(RGB)
    files = [(f, k) for k, n in enumerate(names) for f in sorted((data / "folder" / n).glob("[0-9].png"))]
    with torch.no_grad():
        classes = theirs.encode_text(tokenizer([f"a photo of a {n}." for n in names]), normalize=True)
        images = torch.stack([preprocess(Image.open(f)) for f, _ in files])
        predicted = (theirs.encode_image(images, normalize=True) @ classes.T).argmax(dim=1)
    expected = sum(int(p) == k for p, (_, k) in zip(predicted, files)) / len(files)
    assert metrics["top1"] == pytest.approx(expected)
    confusion = [[0] * 3 for _ in range(3)]  # image by image: the same predictions
    for p, (_, k) in zip(predicted.tolist(), files):
        confusion[k][p] += 1
    assert (out / "confusion.csv").read_text().split() == [",".join(map(str, row)) for row in confusion]

    cap = tmp_path / "cap"
    assert main(["eval", "caption", str(snap), "--data", str(data / "captions.json"), "--out", str(cap),
                 "--max-new-tokens", "3", "--tokenizer", "simple", *QUIET]) == 0
    captions = json.loads((cap / "captions.json").read_text())
    assert len(captions) == 6 and not any("<start_of_text>" in c["caption"] for c in captions)

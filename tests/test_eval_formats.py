"""The on-disk formats of the evaluation tasks (mammut.data.formats), built on the fly: what
each reader lists, and a clear error naming the argument for each kind of bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mammut.data.formats import read_captioned_images, read_image_folder, read_lines, read_vqa


def _png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_image_folder_sorted_classes_and_labels(tmp_path):
    for name, n in (("zebra", 2), ("ant", 1), ("cat", 3)):
        for i in range(n):
            _png(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / "cat" / "deeper" / "x.jpg")
    ds = read_image_folder(tmp_path)
    assert ds.classes == ["ant", "cat", "zebra"]
    assert ds.labels == [0, 1, 1, 1, 1, 2, 2]  # cat: 3 + 1 in a sub-folder; the .txt is not listed
    assert all(p.suffix in (".png", ".jpg") for p in ds.paths)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data: no such folder"):
        read_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data: expected an ImageFolder .* no sub-folders"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(ValueError, match="expected image files .* got none in 1 folders"):
        read_image_folder(tmp_path / "empty")
    _png(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match=r"no sub-folders \(1 images directly in it\)"):
        read_image_folder(tmp_path / "flat")


def _karpathy(tmp_path):
    images = []
    for i, split in enumerate(["test", "test", "train", "val"]):
        sub = "val2014" if i == 0 else ""
        _png(tmp_path / "imgs" / sub / f"im{i}.jpg")
        entry = {"filename": f"im{i}.jpg", "split": split, "cocoid": 100 + i,
                 "sentences": [{"raw": f"caption {i} a", "tokens": ["x"]}, {"raw": f"caption {i} b"}]}
        if sub:
            entry["filepath"] = sub
        images.append(entry)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_split_filepath_and_ids(tmp_path):
    path = _karpathy(tmp_path)
    ds = read_captioned_images(path, tmp_path / "imgs", split="test")
    assert ds.layout == "karpathy" and ds.split == "test" and ds.ids == [100, 101]
    assert ds.paths == [tmp_path / "imgs" / "val2014" / "im0.jpg", tmp_path / "imgs" / "im1.jpg"]
    assert ds.captions == [["caption 0 a", "caption 0 b"], ["caption 1 a", "caption 1 b"]]
    assert len(read_captioned_images(path, tmp_path / "imgs", split="all").paths) == 4
    with pytest.raises(ValueError, match=r"--split: expected one of the splits .* \(test, train, val, or all\), got 'restval'"):
        read_captioned_images(path, tmp_path / "imgs", split="restval")


def test_coco_captions_layout(tmp_path):
    for i in (1, 2, 3):
        _png(tmp_path / f"{i:012d}.jpg")
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
            "annotations": [{"image_id": 2, "caption": "two a"}, {"image_id": 1, "caption": "one"},
                            {"image_id": 2, "caption": "two b"}, {"image_id": 9, "caption": "orphan"}]}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    ds = read_captioned_images(path)  # images next to the file
    assert ds.layout == "coco" and ds.ids == [1, 2]  # image 3 has no caption; image 9 is not listed
    assert ds.captions == [["one"], ["two a", "two b"]]
    assert ds.left_out() == {"images_without_captions": 1, "captions_unknown_image": 1, "empty_captions": 0}


def test_csv_empty_caption_cells_are_counted_and_left_out(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png")
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\na.png,first of a\na.png,\nb.png,  \n")
    ds = read_captioned_images(path)
    assert [p.name for p in ds.paths] == ["a.png"] and ds.captions == [["first of a"]]
    assert ds.left_out() == {"images_without_captions": 1, "captions_unknown_image": 0, "empty_captions": 2}
    path.write_text("filepath,title\na.png,\n")
    with pytest.raises(ValueError, match=r"--data: expected rows .* non-empty 'title', got none .*1 empty caption"):
        read_captioned_images(path)


def test_csv_groups_rows_by_image(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\na.png,first of a\nb.png,only b\na.png,\"second, of a\"\n")
    ds = read_captioned_images(path)
    assert ds.layout == "csv" and [p.name for p in ds.paths] == ["a.png", "b.png"]
    assert ds.captions == [["first of a", "second, of a"], ["only b"]]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("img\ttext\na.png\thello\n")
    assert read_captioned_images(tsv, img_key="img", caption_key="text").captions == [["hello"]]
    with pytest.raises(ValueError, match=r"--caption-key: expected a column of .* \(img, text\), got 'title'"):
        read_captioned_images(tsv, img_key="img")


@pytest.mark.parametrize("content, match", [
    ("{not json", r"--data: expected a JSON file, got .* line 1"),
    ("[1, 2]", r"--data: expected a Karpathy-split JSON .* got .* with a JSON list"),
    ('{"images": [{"file_name": "a.jpg"}]}', r"images\[0\] has keys \['file_name'\] and no \"annotations\""),
    ('{"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}', r"sentences\"\] to be a non-empty list"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
     r"annotations\[0\] to hold \"image_id\" and \"caption\""),
])
def test_caption_files_wrong_layout(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_captioned_images(path)


def test_caption_file_missing_and_images_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data: no such file"):
        read_captioned_images(tmp_path / "nope.json")
    path = _karpathy(tmp_path)
    with pytest.raises(FileNotFoundError, match="--images: no such folder"):
        read_captioned_images(path, tmp_path / "no-images")


def _vqa_files(tmp_path, subtype="val2014"):
    _png(tmp_path / "imgs" / f"COCO_{subtype}_{7:012d}.jpg")
    _png(tmp_path / "imgs" / "8.png")
    q = {"data_subtype": subtype, "questions": [
        {"question_id": 70, "image_id": 7, "question": "what colour?"},
        {"question_id": 71, "image_id": 7, "question": "how many?"},
        {"question_id": 80, "image_id": 8, "question": "is it red?"},
        {"question_id": 99, "image_id": 9, "question": "no annotation"}]}
    a = {"annotations": [
        {"question_id": 70, "answers": [{"answer": "red"}] * 10, "answer_type": "other", "question_type": "what"},
        {"question_id": 71, "answers": [{"answer": "2"}] * 10, "answer_type": "number", "question_type": "how many"},
        {"question_id": 80, "answers": ["yes", "no"], "answer_type": "yes/no"}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    return tmp_path / "q.json", tmp_path / "a.json", tmp_path / "imgs"


def test_vqa_reader(tmp_path):
    q, a, imgs = _vqa_files(tmp_path)
    ds = read_vqa(q, a, imgs)
    assert [x.question_id for x in ds.questions] == [70, 71, 80] and ds.unannotated == 1
    assert ds.questions[0].answers == ["red"] * 10 and ds.questions[2].answers == ["yes", "no"]
    assert ds.questions[2].question_type == "unknown" and ds.questions[1].answer_type == "number"
    assert ds.image_paths[7].name == "COCO_val2014_000000000007.jpg" and ds.image_paths[8].name == "8.png"
    custom = read_vqa(q, a, imgs, image_template="img-{image_id}.jpg")
    assert custom.image_paths[7].name == "img-7.jpg"  # listed, counted missing when loaded
    with pytest.raises(ValueError, match=r"--image-template: expected a format string .* got '\{nope\}'"):
        read_vqa(q, a, imgs, image_template="{nope}")


def test_vqa_reader_errors(tmp_path):
    q, a, imgs = _vqa_files(tmp_path)
    with pytest.raises(ValueError, match=r"--questions: expected a VQAv2 questions file .* got keys \['annotations'\]"):
        read_vqa(a, a, imgs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": []}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] to hold \"question_id\" and a non-empty \"answers\""):
        read_vqa(q, bad, imgs)
    bad.write_text(json.dumps({"annotations": [{"question_id": 12345, "answers": ["x"]}]}))
    with pytest.raises(ValueError, match="got none that match a question_id"):
        read_vqa(q, bad, imgs)


def test_read_lines(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# comment\ncat\n\n  dog  \n")
    assert read_lines(path, "--classnames") == ["cat", "dog"]
    path.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="--classnames: expected one entry per line, got an empty file"):
        read_lines(path, "--classnames")

"""``mammut index`` / ``mammut search``: collections (folder, CSV, shards), building and
searching, unreadable images, ``--add``, exact vs IVF-PQ recall, the memory budget, resuming
after a kill, the CLI with a real (tiny) model, and the split across torchrun processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mammut.apps import ann
from mammut.apps.build import BuildOptions, build
from mammut.apps.collection import list_items, open_item
from mammut.apps.folder import IndexFolder
from mammut.apps.searcher import SearchIndex
from mammut.apps.store import MetadataStore
from mammut.cli import main
from mammut.data.webdataset import write_webdataset
from test_apps_support import NAMES, PALETTE, ROOT, ColourEncoder, CountingEncoder, colour_folder, draw, train_tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("tiny") / "run")


def _build(source: Path | str, out: Path, encoder=None, **kw) -> object:
    return build(BuildOptions(out=out, source=str(source), progress=False, **kw), encoder or ColourEncoder())


# ----------------------------------------------------------------------------- collections


def test_folder_csv_and_shards_list_their_images(tmp_path):
    colour_folder(tmp_path / "pics")
    (tmp_path / "pics" / "red-0.txt").write_text("a red one\n")
    items = list_items(str(tmp_path / "pics"))
    assert sorted(Path(i.path).name for i in items) == sorted(f"{n}-0.png" for n in NAMES)
    assert sum("nested" in i.path for i in items) == len(NAMES) // 2  # recursive
    assert {i.caption for i in items if i.path.endswith("red-0.png")} == {"a red one"}  # the sidecar .txt

    rows = ["filepath,title", "pics/red-0.png,first", "pics/red-0.png,second", "pics/nested/green-0.png,",
            "pics/missing.png,gone"]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    csv_items = list_items(str(tmp_path / "c.csv"))
    assert [(Path(i.path).name, i.caption) for i in csv_items] == [("red-0.png", "first"), ("green-0.png", None)]
    with pytest.raises(ValueError, match=r"--caption-key: 'text' is not a column of .*c.csv; columns are"):
        list_items(str(tmp_path / "c.csv"), caption_key="text")
    (tmp_path / "n.csv").write_text("filepath\npics/red-0.png\n")  # no caption column: fine
    assert list_items(str(tmp_path / "n.csv"))[0].caption is None

    shards = write_webdataset([(Image.new("RGB", (8, 8), PALETTE[n]), f"a {n} square") for n in NAMES[:5]],
                              tmp_path / "shards", shard_size=2)
    shard_items = list_items(str(tmp_path / "shards" / "shard-{000000..000002}.tar"))
    assert len(shards) == 3 and len(shard_items) == 5
    assert [i.caption for i in shard_items] == [f"a {n} square" for n in NAMES[:5]]
    assert open_item(shard_items[3].path, shard_items[3].member, shard_items[3].offset,
                     shard_items[3].size).getpixel((0, 0)) == PALETTE[NAMES[3]]

    with pytest.raises(FileNotFoundError, match="SOURCE: no shard matches"):
        list_items(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="SOURCE: no images found in"):
        list_items(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- build and search


def test_build_then_search_finds_the_named_colour(tmp_path):
    colour_folder(tmp_path / "pics", copies=2, corrupt=2)
    report = _build(tmp_path / "pics", tmp_path / "idx", chunk_size=5, batch_size=3)
    assert report.total == 2 * len(NAMES) and report.total_corrupt == 2 and report.chunks_done == 4
    index = SearchIndex(tmp_path / "idx")
    enc = ColourEncoder()
    hits = index.search(enc.embed_texts(["something purple"]), k=3)[0]
    assert [h.record.name for h in hits[:2]] == ["purple-0.png", "purple-1.png"]
    assert hits[0].score == pytest.approx(hits[1].score, abs=1e-3) and hits[0].score > hits[2].score
    assert hits[0].record.width == 20 + NAMES.index("purple")  # the image's own size is stored
    data, media = index.image_bytes(hits[0].record.id)
    assert media == "image/png" and data == Path(hits[0].record.path).read_bytes()
    assert len(index.search(enc.embed_texts(["red"]), k=1000)[0]) == 2 * len(NAMES)  # k above the size: all
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 1000\], got 0"):
        index.search(enc.embed_texts(["red"]), k=0)
    with pytest.raises(KeyError, match="no image 999"):
        index.image_bytes(999)
    corrupt = [r for r in MetadataStore(tmp_path / "idx").get(range(100)).values() if r.status == "corrupt"]
    assert sorted(r.name for r in corrupt) == ["broken-0.jpg", "broken-1.jpg"]
    with pytest.raises(KeyError):  # an unreadable image is not served either
        index.image_bytes(corrupt[0].id)
    # the same command again: nothing to do; another source without --add: an error
    again = _build(tmp_path / "pics", tmp_path / "idx")
    assert again.chunks_done == 0 and again.total == 2 * len(NAMES)
    with pytest.raises(ValueError, match=r"--out: .* already holds an index of .*pics; pass --add"):
        _build(tmp_path, tmp_path / "idx")


def test_add_embeds_only_the_new_images(tmp_path):
    pics = tmp_path / "pics"
    for n in NAMES[:4]:
        draw(pics / f"{n}.png", n)
    _build(pics, tmp_path / "idx", chunk_size=3)
    before = SearchIndex(tmp_path / "idx")
    assert before.size == 4
    assert before.search(ColourEncoder().embed_texts(["black"]), 1)[0][0].record.name != "black.png"
    for n in NAMES[4:]:
        draw(pics / f"{n}.png", n)
    counting = CountingEncoder()
    report = build(BuildOptions(out=tmp_path / "idx", source=str(pics), add=True, chunk_size=3, progress=False), counting)
    assert counting.embedded == len(NAMES) - 4 and report.total == len(NAMES)
    after = SearchIndex(tmp_path / "idx")
    assert after.size == len(NAMES)
    assert after.search(ColourEncoder().embed_texts(["black"]), 1)[0][0].record.name == "black.png"
    assert sorted(r.id for r in MetadataStore(tmp_path / "idx").get(range(100)).values()) == list(range(len(NAMES)))


def test_add_under_another_spelling_of_the_path_adds_nothing(tmp_path):
    pics = colour_folder(tmp_path / "pics")
    (tmp_path / "x").mkdir()
    (tmp_path / "link").symlink_to(pics)
    _build(pics, tmp_path / "idx", chunk_size=3)
    counting = CountingEncoder()
    for other in (tmp_path / "x" / ".." / "pics", tmp_path / "link"):
        report = build(BuildOptions(out=tmp_path / "idx", source=str(other), add=True, progress=False), counting)
        assert counting.embedded == 0 and report.total == len(NAMES), other
    info = IndexFolder(tmp_path / "idx").read_info()
    assert [s["source"] for s in info["sources"]] == [str(pics.resolve())]
    assert SearchIndex(tmp_path / "idx").size == len(NAMES)


def test_add_keeps_the_index_settings_unless_given_again(tmp_path):
    pics = tmp_path / "pics"
    for n in NAMES[:4]:
        draw(pics / f"{n}.png", n)
    _build(pics, tmp_path / "idx", memory_budget=100, nlist=3, train_size=2000)  # 100 bytes: over budget, mmap
    folder = IndexFolder(tmp_path / "idx")
    assert folder.read_info()["index"]["mmap"] is True
    settings = {"ivf_threshold": 100_000, "memory_budget": 100, "nlist": 3, "pq_m": None, "train_size": 2000}
    assert folder.read_info()["settings"] == settings
    draw(pics / "black.png", "black")
    build(BuildOptions(out=tmp_path / "idx", add=True, progress=False), ColourEncoder())  # none given: the index's
    assert folder.read_info()["settings"] == settings and folder.read_info()["index"]["mmap"] is True
    assert SearchIndex(tmp_path / "idx").mmap
    draw(pics / "white.png", "white")
    build(BuildOptions(out=tmp_path / "idx", add=True, memory_budget=2**30, progress=False), ColourEncoder())
    assert folder.read_info()["settings"] == {**settings, "memory_budget": 2**30}  # given anew: kept from now on
    assert folder.read_info()["index"]["mmap"] is False and SearchIndex(tmp_path / "idx").size == 6


def test_a_stop_between_the_faiss_file_and_index_json_does_not_duplicate_vectors(tmp_path, monkeypatch):
    pics = tmp_path / "pics"
    for n in NAMES[:4]:
        draw(pics / f"{n}.png", n)
    _build(pics, tmp_path / "idx", chunk_size=2)
    for n in NAMES[4:]:
        draw(pics / f"{n}.png", n)

    class Killed(BaseException):
        pass

    write_info = IndexFolder.write_info

    def stop_before_ready(self, info):
        if info.get("status") == "ready":
            raise Killed  # index.faiss is written, index.json not yet
        write_info(self, info)

    monkeypatch.setattr(IndexFolder, "write_info", stop_before_ready)
    with pytest.raises(Killed):
        build(BuildOptions(out=tmp_path / "idx", source=str(pics), add=True, chunk_size=2, progress=False),
              ColourEncoder())
    monkeypatch.setattr(IndexFolder, "write_info", write_info)
    assert ann.read_index(tmp_path / "idx" / "index.faiss").ntotal == len(NAMES)  # the new vectors are in
    counting = CountingEncoder()
    build(BuildOptions(out=tmp_path / "idx", source=str(pics), chunk_size=2, progress=False), counting)  # resume
    assert counting.embedded == 0
    index = SearchIndex(tmp_path / "idx")
    assert index.size == len(NAMES)  # not len(NAMES) + the new ones again
    ids = [h.record.id for h in index.search(ColourEncoder().embed_texts(["black"]), 100)[0]]
    assert sorted(ids) == list(range(len(NAMES)))


def test_bad_index_files_and_settings_are_one_line_errors(tmp_path):
    pics = colour_folder(tmp_path / "pics")
    with pytest.raises(ValueError, match=r"--train-size: expected an int >= 624, got 10"):
        _build(pics, tmp_path / "a", train_size=10)
    with pytest.raises(ValueError, match=r"--train-size: expected at least 39 training vectors per IVF list "
                                         r"\(39 x --nlist 100 = 3900\), got 1000"):
        _build(pics, tmp_path / "a", nlist=100, train_size=1000)
    for name, value in (("nlist", 0), ("pq_m", -1), ("memory_budget", 0)):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}: expected an int >= 1, got {value}"):
            _build(pics, tmp_path / "a", **{name: value})
    counting = CountingEncoder()
    with pytest.raises(ValueError, match=r"--pq-m: expected a divisor of the embedding size"):
        _build(pics, tmp_path / "a", counting, pq_m=7)
    assert counting.embedded == 0 and not (tmp_path / "a").exists()  # refused before any work

    _build(pics, tmp_path / "idx")
    faiss_file = tmp_path / "idx" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:40])  # cut short
    with pytest.raises(ValueError, match=r"DIR: expected a FAISS index in .*index.faiss, got a file faiss cannot read"):
        SearchIndex(tmp_path / "idx")
    faiss_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"DIR: expected the FAISS index .*index.faiss, got no such file"):
        SearchIndex(tmp_path / "idx")


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d))
    x = centres[rng.integers(0, 64, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_exact_and_ivfpq_recall_at_10_on_synthetic_vectors():
    x, q = _clustered(6000, 64), _clustered(200, 64, seed=1)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    ids = np.arange(len(x), dtype=np.int64)
    flat_plan = ann.plan_index(len(x), 64)
    assert flat_plan.kind == "flat"
    flat = ann.build_index(flat_plan, lambda: [(ids, x)])
    assert _recall(ann.search_index(flat, q, 10)[1], truth) == 1.0
    ivf_plan = ann.plan_index(len(x), 64, ivf_threshold=1000)
    assert ivf_plan.kind == "ivfpq" and ivf_plan.pq_m == 32 and ivf_plan.nlist >= 8
    ivf = ann.build_index(ivf_plan, lambda: [(ids[:3000], x[:3000]), (ids[3000:], x[3000:])], lambda k: x[:k])
    recall = _recall(ann.search_index(ivf, q, 10, nprobe=16)[1], truth)
    assert 0.5 < recall < 1.0, recall  # approximate, but finds most


def test_ivfpq_index_with_rerank_and_memory_budget(tmp_path):
    # 1,200 pictures of random colours, embedded smoothly: enough to train an IVF-PQ index on
    enc = ColourEncoder(width=0.3)
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1200):
        Image.new("RGB", (8, 8), tuple(int(v) for v in rng.integers(0, 256, 3))).save(pics / f"{i:04d}.png")
    _build(pics, tmp_path / "ivf", enc, ivf_threshold=1000, chunk_size=256, batch_size=128)
    _build(pics, tmp_path / "flat", enc, chunk_size=256, batch_size=128)
    ivf, flat = SearchIndex(tmp_path / "ivf"), SearchIndex(tmp_path / "flat")
    assert ivf.kind == "ivfpq" and flat.kind == "flat" and ivf.size == flat.size == 1200
    q = enc.embed_images(torch.rand(50, 3, 1, 1, generator=torch.Generator().manual_seed(0)).expand(50, 3, 4, 4))
    exact = np.array([[h.record.id for h in row] for row in flat.search(q, 10)])
    reranked = np.array([[h.record.id for h in row] for row in ivf.search(q, 10)])
    codes_only = np.array([[h.record.id for h in row] for row in SearchIndex(tmp_path / "ivf", rerank=1).search(q, 10)])
    assert _recall(codes_only, exact) < _recall(reranked, exact)
    assert _recall(reranked, exact) >= 0.8  # re-ranking 16k candidates with the stored vectors
    for row in ivf.search(q, 10):  # re-ranked: exact scores, in order
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    mapped = SearchIndex(tmp_path / "ivf", mmap=True)
    assert np.array_equal(np.array([[h.record.id for h in row] for row in mapped.search(q, 10)]), reranked)

    # a budget the exact index does not fit: IVF-PQ below the threshold; one nothing fits: memory-mapped
    assert ann.plan_index(200_000, 512, memory_budget=100 * 2**20).kind == "ivfpq"
    tight = ann.plan_index(200_000, 512, memory_budget=2 * 2**20)
    assert tight.kind == "ivfpq" and tight.mmap and tight.pq_m == 1
    assert ann.plan_index(200_000, 512, memory_budget=8 * 2**20).pq_m == 8  # the largest code that fits
    with pytest.raises(ValueError, match=r"--pq-m: expected a divisor of the embedding size 512"):
        ann.plan_index(200_000, 512, pq_m=7)


# ----------------------------------------------------------------------------- resume after a kill


_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_apps_support import BlockingEncoder
from mammut.apps.build import BuildOptions, build
build(BuildOptions(out={out!r}, source={src!r}, chunk_size=4, batch_size=4, progress=False),
      BlockingEncoder(1, {blocked!r}, {log!r}))
"""


def test_a_killed_build_resumes_without_redoing_a_chunk(tmp_path):
    pics = colour_folder(tmp_path / "pics", copies=2)  # 16 images: 4 chunks of 4
    blocked, log = tmp_path / "blocked", tmp_path / "embedded.log"
    script = _SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "idx"), src=str(pics), blocked=str(blocked),
                            log=str(log))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # the encoder says when it has embedded its one batch and is stuck
            if blocked.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert blocked.exists(), proc.stderr.read() if proc.poll() is not None else "not blocked after 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = IndexFolder(tmp_path / "idx")
    assert log.read_text() == "4\n"  # one batch = chunk 0, then the kill
    assert folder.read_chunk(0) is not None and all(folder.read_chunk(c) is None for c in (1, 2, 3))
    first = folder.chunk_npy(0).stat().st_mtime_ns, folder.chunk_npy(0).read_bytes()
    with pytest.raises(ValueError, match="not finished"):
        SearchIndex(tmp_path / "idx")

    counting = CountingEncoder()
    report = build(BuildOptions(out=tmp_path / "idx", source=str(pics), chunk_size=4, batch_size=4, progress=False),
                   counting)
    assert counting.embedded == 12 and report.chunks_done == 3 and report.chunks_skipped == 1  # chunk 0 not redone
    assert (folder.chunk_npy(0).stat().st_mtime_ns, folder.chunk_npy(0).read_bytes()) == first

    # the same as a build that was never interrupted
    _build(pics, tmp_path / "whole", chunk_size=4, batch_size=4)
    whole = IndexFolder(tmp_path / "whole")
    for c in range(4):
        assert np.array_equal(np.load(folder.chunk_npy(c)), np.load(whole.chunk_npy(c)))
        assert folder.read_chunk(c)["ids"] == whole.read_chunk(c)["ids"]
    a, b = SearchIndex(tmp_path / "idx"), SearchIndex(tmp_path / "whole")
    q = ColourEncoder().embed_texts(NAMES)
    assert [[(h.record.id, h.score) for h in r] for r in a.search(q, 5)] == \
        [[(h.record.id, h.score) for h in r] for r in b.search(q, 5)]


# ----------------------------------------------------------------------------- the CLI, a real model


def test_cli_index_search_and_errors(tiny_run, tmp_path, capsys):
    pics = colour_folder(tmp_path / "pics", corrupt=1)
    out = tmp_path / "idx"
    assert main(["index", str(pics), "--model", str(tiny_run), "--out", str(out), "--chunk-size", "3",
                 "--batch-size", "2", "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"{len(NAMES)} images indexed (1 unreadable, skipped)" in text and "exact inner-product index" in text
    assert main(["search", str(out), "a red square", "-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(-1.0 <= r["score"] <= 1.0 for r in rows)
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    assert main(["search", str(out), "--image", str(pics / "red-0.png"), "-k", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id", "name", "caption"] and "red-0.png" in table[1]

    draw(pics / "late" / "new-red.png", "red")  # --add alone: the index's sources again, with its model
    assert main(["index", "--add", "--out", str(out), "--no-progress"]) == 0
    assert "this run embedded 1 in 1 chunks" in capsys.readouterr().out
    assert SearchIndex(out).size == len(NAMES) + 1

    for argv, message in [
        (["search", str(out), "  "], "QUERY: expected a non-empty text, got ''"),
        (["search", str(out), "cat", "-k", "0"], "k: expected an int in [1, 1000], got 0"),
        (["search", str(out), "cat", "-k", "100000000"], "k: expected an int in [1, 1000], got 100000000"),
        (["search", str(tmp_path / "nope"), "cat"], "DIR: expected an index folder, got"),
        (["search", str(out)], "QUERY: expected a text or --image FILE, got neither"),
        (["search", str(out), "--image", str(pics / "broken-0.jpg")], "--image: not a readable image"),
        (["index", str(tmp_path / "void"), "--model", str(tiny_run), "--out", str(tmp_path / "i2")], "SOURCE"),
        (["index", str(pics), "--model", str(tiny_run), "--out", str(out), "--batch-size", "0"],
         "--batch-size: expected an int >= 1, got 0"),
        (["index", str(pics), "--add", "--out", str(tmp_path / "none")], "--add: no index to add to in"),
        (["search", str(out), "cat", "--model", str(tmp_path)], f"--model: {out} was built with {tiny_run}"),
        (["serve", str(out), "--model", str(tmp_path)], f"--model: {out} was built with {tiny_run}"),
        (["index", str(pics), "--model", str(tiny_run), "--out", str(tmp_path / "i4"), "--train-size", "5"],
         "--train-size: expected an int >= 624, got 5"),
        (["index", str(pics), "--model", str(tiny_run), "--out", str(tmp_path / "i3"), "--memory-budget", "lots"],
         "--memory-budget: expected a size such as 4G"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"mammut {argv[0]}: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.filterwarnings("ignore:precision bf16")
def test_bf16_embeddings_agree_with_float32(tiny_run, tmp_path):
    from mammut.apps.encoder import load_encoder

    pics = colour_folder(tmp_path / "pics")
    fp32, bf16 = load_encoder(tiny_run, precision="fp32"), load_encoder(tiny_run, bf16=True)
    assert fp32.precision.name == "fp32" and bf16.precision.name == "bf16" and bf16.bf16
    images = torch.stack([fp32.preprocess(Image.open(p).convert("RGB")) for p in sorted(pics.rglob("*.png"))])
    a, b = fp32.embed_images(images), bf16.embed_images(images)
    assert a.dtype == b.dtype == np.float32 and not np.array_equal(a, b)  # bf16 did run
    assert (np.sum(a * b, axis=1) > 0.99).all()
    for flags, name in ((["--bf16"], "bf16"), (["--precision", "fp32"], "fp32"), ([], None)):
        out = tmp_path / f"idx-{name}"
        assert main(["index", str(pics), "--model", str(tiny_run), "--out", str(out), *flags, "--no-progress"]) == 0
        assert SearchIndex(out).size == len(NAMES)
        info = IndexFolder(out).read_info()
        assert info["model"] == str(tiny_run) and info["precision"] == (name or load_encoder(tiny_run).precision.name)
        assert info["precision_requested"] == (name or "auto") and info["precision_reason"]


def test_the_apps_package_imports_only_argparse():
    code = ("import sys, mammut.apps, mammut.cli; mammut.cli._parser(); "
            "print(sorted(m for m in ('fastapi', 'faiss', 'uvicorn', 'torchvision', 'sqlite3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_serve_a_run_folder_indexes_its_heldout_scenes_first(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    import uvicorn
    from fastapi.testclient import TestClient

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("search-index"))
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", str(run)]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8000  # this machine only, by default
    scenes = len((run / "search-index" / "heldout-scenes" / "captions.csv").read_text().splitlines()) - 1
    assert 100 < scenes <= 512  # the tiny run's 20 emoji have fewer than 512 distinct held-out captions
    assert f"serving {scenes} images of" in capsys.readouterr().out
    client = TestClient(served["app"], base_url="http://127.0.0.1:8000")
    info = client.get("/api/info").json()
    assert info["size"] == scenes and info["model"] == "run"  # the model's name, not the server's path
    first = client.get("/api/search", params={"q": "a cat", "k": 3}).json()["results"][0]
    assert client.get(first["image_url"]).headers["content-type"] == "image/png"
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "DIR: expected an index folder, got" in capsys.readouterr().err


def test_index_and_serve_the_demo_heldout_scenes(tiny_run, tmp_path, capsys):
    assert main(["index", "--demo-heldout", str(tiny_run), "--n", "24", "--no-progress"]) == 0
    assert "24 images indexed (0 unreadable" in capsys.readouterr().out
    index = SearchIndex(tiny_run / "search-index")
    records = MetadataStore(tiny_run / "search-index").get(range(24))
    assert len(records) == 24 and all(r.caption and r.caption.startswith("a ") for r in records.values())
    assert len({r.caption for r in records.values()}) == 24  # one scene per caption
    assert index.size == 24


@pytest.mark.slow
def test_torchrun_two_processes_split_the_chunks(tiny_run, tmp_path):
    pics = colour_folder(tmp_path / "pics", copies=2, corrupt=1)  # 17 files: 5 chunks of 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["index", str(pics), "--model", str(tiny_run), "--chunk-size", "4", "--batch-size", "4", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mammut.cli", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("images indexed") == 1  # rank 0 reports
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = IndexFolder(tmp_path / "two"), IndexFolder(tmp_path / "one")
    assert {two.read_chunk(c)["rank"] for c in range(5)} == {0, 1}  # both processes embedded chunks
    for c in range(5):
        assert two.read_chunk(c)["ids"] == one.read_chunk(c)["ids"]
        np.testing.assert_allclose(np.load(two.chunk_npy(c)).astype(np.float32),
                                   np.load(one.chunk_npy(c)).astype(np.float32), atol=2e-3)
    assert two.read_info()["count"] == one.read_info()["count"] == {"ok": 16, "corrupt": 1, "pending": 0}

    # rank 0 cannot plan (no such source): every process stops, none waits for a plan
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mammut.cli", "index", str(tmp_path / "void.csv"), "--model", str(tiny_run),
                          "--out", str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "SOURCE: no such CSV/TSV file" in bad.stderr

"""Data robustness: over-long captions never stop a run, repeatable WebDataset runs and exact
resume, clear errors for bad paths / files, self-contained run folders, held-out eval pairs."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from mammut.cli import main as cli_main
from mammut.data.datasets import CsvImageText
from mammut.data.webdataset import expand_shards, webdataset_pipeline, write_webdataset
from mammut.data.scenes import EmojiScenes
from mammut.data.tokenizer import Tokenizer, train_bpe
from mammut.train.config import load_config
from mammut.data.sources import EvalPairs, eval_pairs
from mammut.train.data import _IndexedSource
from mammut.train.loop import Trainer

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128),
          (0, 0, 0)]
NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta", "grey", "black"]
LONG = " ".join(f"w{i}" for i in range(400))  # >= 400 tokens with any BPE: one word at least one token


def _png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _csv(tmp_path: Path, rows: list[tuple[str, str]] | None = None, name: str = "train.csv") -> Path:
    """8 coloured squares with short captions; row 7 of the file (sample 6) has a 400-word caption."""
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    for c, n in zip(COLORS, NAMES):
        (img / f"{n}.png").write_bytes(_png(c))
    if rows is None:
        rows = [(f"img/{n}.png", f"a {n} square") for n in NAMES]
        rows[5] = (rows[5][0], LONG)
    path = tmp_path / name
    path.write_text("filepath,title\n" + "".join(f'{f},"{t}"\n' for f, t in rows), encoding="utf-8")
    return path


def tiny(tmp_path: Path, *extra: str):
    base = ["--train.out_dir", str(tmp_path / "run"), "--train.progress", "false", "--train.threads", "1",
            "--train.log_every", "1", "--train.report", "false"]
    return load_config("tiny", base + list(extra))


# --------------------------------------------------------------------------- 1. long captions


@pytest.mark.parametrize("truncate", ["true", "false"])
def test_long_caption_never_stops_a_csv_run(tmp_path, caplog, truncate):
    csv_path = _csv(tmp_path)
    cfg = tiny(tmp_path, "--data.kind", "csv", "--data.path", str(csv_path), "--train.steps", "3",
               "--data.truncate", truncate)
    with caplog.at_level(logging.WARNING, logger="mammut"):
        result = Trainer(cfg).fit()
    assert result.step == 3 and len(result.losses) == 3
    skipped = [r.getMessage() for r in caplog.records if "longer than data.max_len" in r.getMessage()]
    if truncate == "false":
        assert len(skipped) == 1, skipped
        msg = skipped[0]
        assert f"{csv_path} row 7" in msg and "skipped 1 of 8 rows" in msg and "data.truncate: false" in msg
    else:
        assert skipped == []


def test_truncate_false_drops_rows_up_front_and_keeps_the_rest_deterministic(tmp_path):
    csv_path = _csv(tmp_path)
    cfg = tiny(tmp_path, "--data.kind", "csv", "--data.path", str(csv_path), "--data.truncate", "false").data
    tok = train_bpe([f"a {n} square" for n in NAMES] + [LONG], vocab_size=300)
    src = _IndexedSource(cfg, seed=0, tokenizer=tok)
    assert len(src.ds) == 7 and src.skipped_long == 1
    assert all(c != LONG for _, c in src.ds.samples) and 7 not in src.ds.rows
    again = _IndexedSource(cfg, seed=0, tokenizer=tok)
    assert [src(i)[1] for i in range(20)] == [again(i)[1] for i in range(20)]
    # every caption over-long: a clear error naming the config keys
    cfg_short = tiny(tmp_path, "--data.kind", "csv", "--data.path", str(csv_path), "--data.truncate", "false",
                     "--data.max_len", "3").data
    with pytest.raises(ValueError, match=r"data.max_len: all 8 captions .* data.truncate: true"):
        _IndexedSource(cfg_short, seed=0, tokenizer=tok)


def test_truncation_keeps_eos():
    tok = train_bpe([f"a {n} square" for n in NAMES] + [LONG], vocab_size=300)
    ids = tok.encode([LONG, "a red square"], max_len=16, truncate=True)
    assert ids.shape == (2, 16) and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    assert tok.num_tokens([LONG, "a red square"]) == [tok.num_tokens([LONG])[0], int((ids[1] != tok.pad_id).sum())]
    assert tok.num_tokens([LONG])[0] >= 402


def test_emoji_truncate_false_replaces_long_scenes(tmp_path, caplog):
    cfg = tiny(tmp_path, "--data.truncate", "false", "--data.max_len", "9").data
    src = _IndexedSource(cfg, seed=0)
    tok = train_bpe([src(i).caption for i in range(200)], vocab_size=400)
    lengths = tok.num_tokens([src(i).caption for i in range(40)])
    assert max(lengths) > 9 >= min(lengths)  # some scenes must be replaced
    strict = _IndexedSource(cfg, seed=0, tokenizer=tok)
    with caplog.at_level(logging.WARNING, logger="mammut.train.data"):
        scenes = [strict(i) for i in range(40)]
    assert all(n <= 9 for n in tok.num_tokens([s.caption for s in scenes]))
    assert strict.skipped_long == sum(n > 9 for n in lengths)
    assert [s.caption for s in scenes] == [_IndexedSource(cfg, seed=0, tokenizer=tok)(i).caption for i in range(40)]
    assert any("replaced by scene" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- webdataset helpers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, Path, list[str]]:
    """40 emoji scenes in 4 shards (one over-long caption: sample 000000013), and a tokenizer."""
    root = tmp_path_factory.mktemp("wds")
    scenes = EmojiScenes(num_emoji=20, image_size=32, seed=5)
    samples = [(scenes[i].image, scenes[i].caption) for i in range(40)]
    captions = [c for _, c in samples]
    samples[13] = (samples[13][0], LONG)
    write_webdataset(samples, root / "shards", shard_size=10)
    tok = train_bpe(captions, vocab_size=400, path=root / "tok.json")
    assert max(tok.num_tokens(captions)) <= 16
    return str(root / "shards" / "shard-{000000..000003}.tar"), root / "tok.json", captions


def _wds_cfg(tmp_path: Path, shards: tuple[str, Path, list[str]], *extra: str):
    pattern, tok, _ = shards
    return tiny(tmp_path, "--data.kind", "webdataset", "--data.path", pattern, "--data.tokenizer", str(tok),
                "--data.shuffle_buffer", "16", "--train.batch_size", "8", *extra)


def test_webdataset_filters_long_captions_in_the_stream(shards, caplog):
    pattern, tok_path, captions = shards
    tok = Tokenizer.from_file(tok_path)

    def check(caption):
        return None if tok.num_tokens([caption])[0] <= 16 else "too long"

    with caplog.at_level(logging.WARNING, logger="mammut.data"):
        pipe = webdataset_pipeline(pattern, transform=T.ToTensor(), caption_check=check)
        got = [c for _, c in pipe]
    assert len(got) == 39 and LONG not in got and pipe.filtered.count == 1
    assert got == captions[:13] + captions[14:]
    assert any("shard-000001.tar key 000000013: too long" in r.getMessage() for r in caplog.records)


def test_webdataset_long_caption_never_stops_a_run(tmp_path, shards, caplog):
    # the 8-sample batches cross the over-long sample in step 2
    for truncate in ("true", "false"):
        cfg = _wds_cfg(tmp_path / truncate, shards, "--train.steps", "6", "--data.truncate", truncate)
        with caplog.at_level(logging.WARNING, logger="mammut"):
            assert Trainer(cfg).fit().step == 6
    assert sum("key 000000013: caption has" in r.getMessage() and "data.max_len=16" in r.getMessage()
               for r in caplog.records) >= 1


# --------------------------------------------------------------------------- 2. repeatable webdataset runs


def test_webdataset_shuffle_is_a_function_of_seed_epoch_rank_worker(shards):
    pattern = shards[0]

    def order(**kw):
        return [c for _, c in webdataset_pipeline(pattern, transform=T.ToTensor(), shuffle=16, **kw)]

    a = order(seed=3)
    assert a == order(seed=3) and sorted(a) == sorted(shards[2][:13] + [LONG] + shards[2][14:])
    assert a != order(seed=4) and a != order(seed=3, epoch=1)
    r0, r1 = order(seed=3, rank=0, world_size=2), order(seed=3, rank=1, world_size=2)
    assert r0 == order(seed=3, rank=0, world_size=2) and sorted(r0 + r1) == sorted(a)


def test_webdataset_runs_repeat_and_resume_exactly(tmp_path, shards):
    args = ("--train.steps", "6", "--train.save_every", "3", "--train.keep_checkpoints", "0")
    ref = Trainer(_wds_cfg(tmp_path / "ref", shards, *args)).fit().losses
    again = Trainer(_wds_cfg(tmp_path / "again", shards, *args)).fit().losses
    assert len(ref) == 6 and again == ref  # same seed, same shards: bitwise the same losses

    class Crash(Exception):
        pass

    cfg = _wds_cfg(tmp_path / "crash", shards, *args)
    trainer = Trainer(cfg)
    step = trainer.train_step

    def crashing(micro):
        out = step(micro)
        if trainer.step == 4:  # after the checkpoint of step 3: step 4 is lost
            raise Crash
        return out

    trainer.train_step = crashing
    with pytest.raises(Crash):
        trainer.fit()
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 3
    assert resumed.fit().losses == ref[3:]


# --------------------------------------------------------------------------- 3. clear errors


def test_expand_shards(tmp_path, caplog):
    for i in (0, 2):
        (tmp_path / f"x-{i:03d}.tar").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mammut.data"):
        got = expand_shards(str(tmp_path / "x-{000..003}.tar"))
    assert got == [str(tmp_path / "x-000.tar"), str(tmp_path / "x-002.tar")]
    assert any("2 of 4 shards" in r.getMessage() for r in caplog.records)
    assert expand_shards(str(tmp_path / "x-*.tar")) == got
    assert expand_shards(f"{tmp_path}/x-000.tar::s3://bucket/y.tar") == [got[0], "s3://bucket/y.tar"]
    with pytest.raises(FileNotFoundError, match=r"data.path: no shard matches '.*y-\{000..003\}.tar' \(4 tried"):
        expand_shards(str(tmp_path / "y-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"data.val_path: no shard matches .* is a folder"):
        expand_shards(str(tmp_path), key="data.val_path")
    with pytest.raises(FileNotFoundError, match="urls: no shard matches"):
        webdataset_pipeline(str(tmp_path / "y-*.tar"))


def test_missing_shards_fail_before_training(tmp_path, shards, capsys):
    missing = str(tmp_path / "x-{000..003}.tar")
    cfg = tiny(tmp_path, "--data.kind", "webdataset", "--data.path", missing, "--data.tokenizer", str(shards[1]))
    with pytest.raises(FileNotFoundError, match=r"data.path: no shard matches '.*x-\{000..003\}.tar'"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing was built
    cfg = _wds_cfg(tmp_path / "b", shards, "--data.val_path", missing)
    with pytest.raises(FileNotFoundError, match="data.val_path: no shard matches"):
        Trainer(cfg)
    # the command line: one line, no traceback
    code = cli_main(["train", "--config", "tiny", "--train.out_dir", str(tmp_path / "cli"), "--data.kind", "webdataset",
                     "--data.path", missing, "--data.tokenizer", str(shards[1])])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mammut train: error: data.path: no shard matches")


def test_non_utf8_and_bad_columns_csv_errors(tmp_path):
    path = _csv(tmp_path)
    data = path.read_bytes().replace(b"a red square", b"a r\xffd square")
    path.write_bytes(data)
    offset = data.index(b"\xff")
    cfg = tiny(tmp_path, "--data.kind", "csv", "--data.path", str(path))
    with pytest.raises(ValueError, match=rf"data.path: .*train.csv is not UTF-8 text \(byte 0xff at offset {offset}, "
                                         r"line 2\); save it as UTF-8"):
        Trainer(cfg)
    with pytest.raises(ValueError, match=r"path: .* is not UTF-8"):
        CsvImageText(path)
    # a byte-order mark is fine
    (tmp_path / "b").mkdir()
    bom = _csv(tmp_path / "b")
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    assert len(CsvImageText(bom)) == 8
    cfg = tiny(tmp_path / "c", "--data.kind", "csv", "--data.path", str(bom), "--data.img_key", "image")
    with pytest.raises(ValueError, match=r"data.img_key='image' is not a column of .*; columns are \['filepath', 'title'\]"):
        Trainer(cfg)
    cfg = tiny(tmp_path / "d", "--data.kind", "csv", "--data.path", str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="data.path: no such file"):
        Trainer(cfg)


# --------------------------------------------------------------------------- 4. self-contained runs


def test_run_folder_keeps_its_tokenizer(tmp_path):
    csv_path = _csv(tmp_path)
    external = tmp_path / "elsewhere" / "tok.json"
    tok = train_bpe([f"a {n} square" for n in NAMES], vocab_size=300, path=external)
    args = ("--data.kind", "csv", "--data.path", str(csv_path), "--data.tokenizer", str(external))
    Trainer(tiny(tmp_path, *args, "--train.steps", "2")).fit()
    copy = tmp_path / "run" / "tokenizer.json"
    assert copy.read_bytes() == external.read_bytes()
    external.unlink()
    texts = [f"a {n} square" for n in NAMES]
    assert torch.equal(Tokenizer.from_file(copy).encode(texts, 16), tok.encode(texts, 16))
    # resume works without the original
    resumed = Trainer(tiny(tmp_path, *args, "--train.steps", "3"), resume=True)
    assert resumed.step == 2 and resumed.fit().step == 3
    # a different data.tokenizer on resume: the run keeps the one its checkpoints were trained with
    train_bpe(["something else entirely"] * 3, vocab_size=270, path=external)
    assert Trainer(tiny(tmp_path, *args, "--train.steps", "4"), resume=True).tokenizer.vocab_size == tok.vocab_size
    assert copy.read_bytes() != external.read_bytes()


def test_bad_tokenizer_file_names_the_key(tmp_path):
    csv_path = _csv(tmp_path)
    bad = tmp_path / "tok.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="data.tokenizer: .*tok.json is not a readable tokenizer.json"):
        Trainer(tiny(tmp_path, "--data.kind", "csv", "--data.path", str(csv_path), "--data.tokenizer", str(bad)))
    with pytest.raises(FileNotFoundError, match="data.tokenizer: no such file"):
        Trainer(tiny(tmp_path, "--data.kind", "csv", "--data.path", str(csv_path), "--data.tokenizer",
                     str(tmp_path / "none.json")))


# --------------------------------------------------------------------------- 5. eval pairs


def test_eval_pairs_csv_groups_captions_of_one_image(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "bad.png").write_bytes(b"not a png")
    rows = [("img/red.png", "a red square"), ("img/green.png", "a green square"), ("img/red.png", "red"),
            ("img/missing.png", "a ghost"), ("img/bad.png", "broken"), ("img/../img/red.png", "crimson block"),
            ("img/blue.png", "a blue square"), ("img/bad.png", "broken again")]
    path = _csv(tmp_path, rows, name="val.csv")
    cfg = tiny(tmp_path, "--data.val_path", str(path), "--data.normalize", "false").data
    pairs = eval_pairs(cfg, str(path), None)
    assert isinstance(pairs, EvalPairs)
    assert pairs.images.shape == (3, 3, 32, 32)
    assert pairs.captions == ["a red square", "a green square", "red", "crimson block", "a blue square"]
    assert pairs.image_index == [0, 1, 0, 0, 2]
    assert [Path(s).name for s in pairs.sources] == ["red.png", "green.png", "blue.png"]
    assert pairs.skipped == 3  # missing + 2 rows of the corrupt image
    assert torch.allclose(pairs.images[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    two = eval_pairs(cfg, str(path), 2)
    assert two.images.shape[0] == 2 and two.image_index == [0, 1, 0, 0] and len(two.captions) == 4
    with pytest.raises(ValueError, match="n: expected None or an int >= 1"):
        eval_pairs(cfg, str(path), 0)
    with pytest.raises(FileNotFoundError, match="data.val_path: no shard matches"):
        eval_pairs(cfg, str(tmp_path / "v-{0..3}.tar"), None, key="data.val_path")


def test_eval_pairs_shards_group_by_image_bytes(tmp_path):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    with wds.TarWriter(str(tmp_path / "val-0.tar")) as sink:
        sink.write({"__key__": "a", "png": red, "txt": "a red square"})
        sink.write({"__key__": "b", "png": blue, "txt": "a blue square"})
        sink.write({"__key__": "c", "png": red, "txt": "red again"})
        sink.write({"__key__": "d", "png": b"garbage", "txt": "broken"})
        sink.write({"__key__": "e", "png": blue})
    cfg = tiny(tmp_path).data
    pairs = eval_pairs(cfg, str(tmp_path / "val-{0..0}.tar"), None)
    assert pairs.images.shape == (2, 3, 32, 32)
    assert pairs.captions == ["a red square", "a blue square", "red again"] and pairs.image_index == [0, 1, 0]
    assert pairs.sources[0].endswith("val-0.tar key a") and pairs.skipped == 2
    assert eval_pairs(cfg, str(tmp_path / "val-0.tar"), 1).captions == ["a red square"]


# --------------------------------------------------------------------------- messages name the sample; bugs are raised


def test_bad_samples_are_named_and_bugs_are_raised(tmp_path, caplog):
    rows = [("img/red.png", "red"), ("img/bad.png", "broken"), ("img/green.png", "green")]
    path = _csv(tmp_path, rows)
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="mammut.data"):
        ds = CsvImageText(path, transform=T.ToTensor())
        assert [c for _, c in (ds[i] for i in range(3))] == ["red", "green", "green"]
    assert ds.num_corrupt == 1
    assert any(f"{path} row 3" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)

    with wds.TarWriter(str(tmp_path / "s-0.tar")) as sink:
        sink.write({"__key__": "ok", "png": _png((255, 0, 0)), "txt": "red"})
        sink.write({"__key__": "broken", "png": b"garbage", "txt": "broken"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mammut.data"):
        pipe = webdataset_pipeline(str(tmp_path / "s-0.tar"), transform=T.ToTensor())
        assert [c for _, c in pipe] == ["red"] and pipe.skipped.count == 1
    assert any("s-0.tar key broken" in r.getMessage() for r in caplog.records)

    def buggy(image):
        raise TypeError("a bug in the transform")

    with pytest.raises(TypeError, match="a bug in the transform"):
        CsvImageText(path, transform=buggy)[0]
    with pytest.raises(TypeError, match="a bug in the transform"):
        list(webdataset_pipeline(str(tmp_path / "s-0.tar"), transform=buggy))


def test_webdataset_with_loader_workers_is_repeatable(shards):
    from torch.utils.data import DataLoader

    def order():
        pipe = webdataset_pipeline(shards[0], transform=T.ToTensor(), shuffle=8, seed=1)
        return [c for _, c in DataLoader(pipe, batch_size=None, num_workers=2)]

    a = order()
    assert len(a) == 40 and a == order()

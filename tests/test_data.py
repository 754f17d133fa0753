"""Data: embedded emoji asset, emoji scenes, CSV and WebDataset readers, collation."""

from __future__ import annotations

import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mammut.data.datasets import CsvImageText, ImageTextCollate, image_transform
from mammut.data.webdataset import SkipCounter, webdataset_pipeline, write_webdataset
from mammut.data.scenes import (
    RELATIONS,
    EmojiScenes,
    default_asset_path,
    heldout_set,
    is_heldout_pair,
    load_emoji_asset,
    make_caption,
    relation_from_boxes,
    verify_split_disjoint,
)
from mammut.data.tokenizer import train_bpe

# ----------------------------------------------------------------------------- asset


def test_asset_ships_with_package() -> None:
    path = default_asset_path()
    assert path.is_file() and path.stat().st_size < 6_000_000
    asset = load_emoji_asset()
    n, s = asset.images.shape[:2]
    assert n > 1000 and asset.images.shape == (n, s, s, 4) and asset.images.dtype == np.uint8
    assert len(set(asset.names)) == n and len(asset.codepoints) == n
    assert all(name == name.lower() and name.strip() == name for name in asset.names)
    assert "doughnut" in asset.names
    assert (asset.images[..., 3].reshape(n, -1).max(axis=1) > 0).all()  # no empty sprite
    notice = (path.parent / "NOTICE-emoji.txt").read_text(encoding="utf-8")
    assert "SIL OPEN FONT LICENSE Version 1.1" in notice and "Noto" in notice


# ----------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic() -> None:
    a, b = EmojiScenes(seed=3), EmojiScenes(seed=3)
    for i in (0, 7, 123456):
        sa, sb = a[i], b[i]
        assert torch.equal(sa.image, sb.image) and sa.caption == sb.caption and sa.emoji_ids == sb.emoji_ids
    assert not torch.equal(a[0].image, a[1].image)
    assert not torch.equal(a[0].image, EmojiScenes(seed=4)[0].image)
    assert not torch.equal(a[0].image, EmojiScenes(seed=3, split="heldout")[0].image)


def test_scene_image_and_caption_format() -> None:
    ds = EmojiScenes(image_size=48, num_emoji=40, max_objects=2)
    for i in range(40):
        s = ds[i]
        assert s.image.shape == (3, 48, 48) and s.image.dtype == torch.float32
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        assert 1 <= s.n_objects <= 2 and len(set(s.emoji_ids)) == s.n_objects
        assert s.names == tuple(ds.class_names()[j] for j in s.emoji_ids)
        if s.n_objects == 1:
            assert s.caption == f"a {s.names[0]}"
        else:
            assert s.caption == f"a {s.names[0]} {s.relations[0]} a {s.names[1]}"
    assert len(ds.class_names()) == ds.num_emoji == 40


def test_relations_match_geometry_and_pixels() -> None:
    ds = EmojiScenes(max_objects=3, seed=5)
    counts = dict.fromkeys(RELATIONS, 0)
    for i in range(300):
        s = ds[i]
        assert s.caption == make_caption(s.names, s.relations)
        for (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1), rel in zip(s.boxes, s.boxes[1:], s.relations):
            counts[rel] += 1
            acx, acy, bcx, bcy = (ax0 + ax1) / 2, (ay0 + ay1) / 2, (bx0 + bx1) / 2, (by0 + by1) / 2
            horizontal = abs(bcx - acx) > abs(bcy - acy)
            expected = {
                "left of": horizontal and ax1 <= bx0,
                "right of": horizontal and bx1 <= ax0,
                "above": not horizontal and ay1 <= by0,
                "below": not horizontal and by1 <= ay0,
            }
            assert expected[rel], (i, s.caption, s.boxes)
        # everything outside the boxes is plain background
        outside = torch.ones(ds.image_size, ds.image_size, dtype=torch.bool)
        for x0, y0, x1, y1 in s.boxes:
            outside[y0:y1, x0:x1] = False
            assert (s.image[:, y0:y1, x0:x1] != s.image[:, outside].mean(dim=1)[:, None, None]).any()
        bg = s.image[:, outside]
        assert torch.allclose(bg, bg[:, :1].expand_as(bg))
    assert all(v > 20 for v in counts.values()), counts
    assert relation_from_boxes((0, 0, 10, 10), (20, 2, 30, 12)) == "left of"
    assert relation_from_boxes((0, 0, 10, 10), (5, 5, 15, 15)) is None


def test_heldout_pairs_disjoint_from_train() -> None:
    train = EmojiScenes(num_emoji=60, seed=0)
    heldout = EmojiScenes(num_emoji=60, seed=0, split="heldout")
    stats = verify_split_disjoint(train, heldout, n=400)
    total = 60 * 59 // 2
    assert stats["train_pairs"] + stats["heldout_pairs"] == total
    assert 0.12 < stats["heldout_pairs"] / total < 0.28
    train_pairs = {frozenset(train[i].emoji_ids) for i in range(400) if train[i].n_objects == 2}
    held_pairs = {frozenset(heldout[i].emoji_ids) for i in range(400) if heldout[i].n_objects == 2}
    assert train_pairs and held_pairs and not train_pairs & held_pairs
    cps = train.codepoints
    for pair in held_pairs:
        a, b = sorted(pair)
        assert train.pair_is_heldout(a, b) and is_heldout_pair(int(cps[a]), int(cps[b]))
    # the split depends on codepoints only, not on the vocabulary size
    big = EmojiScenes(num_emoji=None)
    index = {int(c): j for j, c in enumerate(big.codepoints)}
    for pair in list(held_pairs)[:20]:
        a, b = sorted(pair)
        assert big.pair_is_heldout(index[int(cps[a])], index[int(cps[b])])
    with pytest.raises(ValueError, match="vocabularies"):
        verify_split_disjoint(train, EmojiScenes(num_emoji=61, split="heldout"), n=1)


def test_heldout_set_and_single_objects_use_new_stream() -> None:
    hs = heldout_set(n=64, num_emoji=60)
    assert hs.images.shape == (64, 3, 64, 64)
    assert len(hs.captions) == len(hs.emoji_ids) == len(hs.n_objects) == 64
    assert set(hs.n_objects) == {1, 2}
    assert all(len(ids) == k and all(0 <= j < 60 for j in ids) for ids, k in zip(hs.emoji_ids, hs.n_objects))
    train = EmojiScenes(num_emoji=60, max_objects=1)
    held = EmojiScenes(num_emoji=60, max_objects=1, split="heldout")
    assert [train[i].boxes for i in range(10)] != [held[i].boxes for i in range(10)]


def test_scene_batch_shapes() -> None:
    ds = EmojiScenes()
    images, captions, ids, n_obj = ds.batch(range(8, 264))
    assert images.shape == (256, 3, 64, 64) and len(captions) == 256
    assert len(ids) == len(n_obj) == 256


def test_scene_iteration_shards_over_workers() -> None:
    ds = EmojiScenes(num_emoji=30, length=12, start=5)
    assert len(ds) == 12
    assert [s.index for s in ds] == list(range(5, 17))
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(s.index for s in loader) == list(range(5, 17))
    assert len(list(itertools.islice(iter(EmojiScenes(num_emoji=30)), 3))) == 3
    with pytest.raises(TypeError, match="unbounded"):
        len(EmojiScenes(num_emoji=30))


def test_scene_arguments_validated() -> None:
    with pytest.raises(ValueError, match="split"):
        EmojiScenes(split="val")
    with pytest.raises(ValueError, match="max_objects"):
        EmojiScenes(max_objects=4)
    with pytest.raises(ValueError, match="num_emoji"):
        EmojiScenes(num_emoji=10**6)
    with pytest.raises(TypeError, match="index"):
        EmojiScenes()["0"]  # type: ignore[index]


# ----------------------------------------------------------------------------- CSV


def _png_bytes(color: tuple[int, int, int], size: int = 20, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else (*color, 128)).save(buf, format="PNG")
    return buf.getvalue()


def test_csv_skips_missing_and_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(_png_bytes((255, 0, 0)))
    (tmp_path / "img" / "blue.png").write_bytes(_png_bytes((0, 0, 255), mode="RGBA"))
    (tmp_path / "img" / "bad.jpg").write_bytes(b"this is not a jpeg")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        'filepath,title\nimg/red.png,a red square\nimg/missing.png,a ghost\n'
        'img/bad.jpg,a broken image\nimg/blue.png,"a blue square, translucent"\n',
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="mammut.data"):
        ds = CsvImageText(csv_path, transform=image_transform(16))
        assert len(ds) == 3 and ds.num_missing == 1
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_corrupt == 1 and ds.num_skipped == 2
    assert any("missing" in r.message for r in caplog.records)
    assert any("corrupt" in r.message for r in caplog.records)
    captions = [c for _, c in items]
    assert set(captions) == {"a red square", "a blue square, translucent"}
    red = items[0][0]
    assert red.shape == (3, 16, 16) and torch.allclose(red[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    # TSV with other column names and an explicit image root
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("path\tcaption\nred.png\tred\n", encoding="utf-8")
    ds2 = CsvImageText(tsv, image_root=tmp_path / "img", img_key="path", caption_key="caption", image_size=8)
    assert ds2[0][0].shape == (3, 8, 8) and ds2[0][1] == "red"
    with pytest.raises(ValueError, match="img_key='filepath'"):
        CsvImageText(tsv)


# ----------------------------------------------------------------------------- WebDataset


def test_webdataset_round_trip_with_corrupt_samples(tmp_path: Path) -> None:
    scenes = EmojiScenes(num_emoji=20, image_size=32, seed=2)
    originals = [scenes[i] for i in range(10)]
    shards = write_webdataset(originals, tmp_path, shard_size=4)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    bad = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "good", "png": _png_bytes((0, 255, 0), size=32), "txt": "a green square"})
        sink.write({"__key__": "corrupt", "png": b"\x89PNG garbage", "txt": "broken"})
        sink.write({"__key__": "notext", "png": _png_bytes((0, 0, 0), size=32)})
    urls = [str(p) for p in shards] + [str(bad)]

    counter = SkipCounter()
    pipe = webdataset_pipeline(urls, transform=T.ToTensor(), handler=counter)
    got = list(pipe)
    assert counter.count == 2 and pipe.skipped is counter
    assert len(got) == 11
    assert got[10][1] == "a green square"
    for (image, caption), s in zip(got, originals):  # unshuffled: shard order, then sample order
        assert caption == s.caption
        assert torch.allclose(image, s.image, atol=1 / 255 + 1e-6)

    # explicit node split: rank 0 reads shards 0 and 2, rank 1 shards 1 and 3
    parts = [list(webdataset_pipeline(urls, transform=T.ToTensor(), rank=r, world_size=2)) for r in (0, 1)]
    assert [len(p) for p in parts] == [4 + 2, 4 + 1]
    assert sorted(c for p in parts for _, c in p) == sorted(c for _, c in got)

    # shuffled, collated into (images, token ids)
    tok = train_bpe([s.caption for s in originals] + ["a green square"], vocab_size=300)
    collate = ImageTextCollate(tok, max_len=32)
    loader = DataLoader(webdataset_pipeline(urls, transform=T.ToTensor(), shuffle=8, seed=1),
                        batch_size=4, collate_fn=collate)
    images, ids = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert ids.shape == (4, 32) and (ids[:, 0] == tok.bos_id).all()


def test_collate_scenes_and_validation() -> None:
    scenes = EmojiScenes(num_emoji=20)
    batch = [scenes[i] for i in range(3)]
    tok = train_bpe([s.caption for s in batch], vocab_size=300)
    images, ids = ImageTextCollate(tok, max_len=40)(batch)
    assert images.shape == (3, 3, 64, 64) and ids.shape == (3, 40)
    assert tok.decode(ids) == [s.caption for s in batch]
    with pytest.raises(TypeError, match="tensor"):
        ImageTextCollate(tok, max_len=40)([(Image.new("RGB", (4, 4)), "a")])
    with pytest.raises(ValueError, match="shape"):
        ImageTextCollate(tok, max_len=40)([(torch.zeros(3, 4, 4), "a"), (torch.zeros(3, 5, 5), "a")])

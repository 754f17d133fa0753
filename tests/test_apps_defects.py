"""Defects of ``mammut index`` / ``search`` / ``serve`` found by attacking them, each pinned by a
test: non-UTF-8 file names, NaN embeddings, two builds of one folder, a file swapped after
indexing, bracketed IPv6 ``Host`` headers, a full disk and stray temp files, a damaged metadata
store, stalled request bodies, and the ``--precision`` choice."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mammut.apps import commands
from mammut.apps.build import BuildOptions, build
from mammut.apps.folder import IndexFolder
from mammut.apps.searcher import SearchIndex
from mammut.apps.server import create_app, default_allowed_hosts
from mammut.apps.store import MetadataStore
from mammut.cli import main
from test_apps_support import NAMES, PALETTE, ColourEncoder, CountingEncoder, colour_folder, draw

ODD = os.fsdecode(b"name\xffbad.png")  # a file name that is not UTF-8


@pytest.fixture()
def fake_model(monkeypatch):
    """``mammut index/search/serve`` with a :class:`ColourEncoder` (``holder["enc"]``) as the model."""
    holder = {"enc": ColourEncoder()}
    monkeypatch.setattr(commands, "_encoder", lambda model, folder, args: holder["enc"])
    return holder


def _index_argv(src: Path, out: Path, *more: str) -> list[str]:
    return ["index", str(src), "--model", "colour-encoder", "--out", str(out), "--no-progress", *more]


def _one_line_error(capsys, command: str, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"mammut {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)
    return err


def _build(src: Path, out: Path, encoder=None, **kw):
    return build(BuildOptions(out=out, source=str(src), progress=False, **kw), encoder or ColourEncoder())


def _png(colour: str, size: tuple[int, int] = (30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, PALETTE[colour]).save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- 2. non-UTF-8 file names


def test_a_non_utf8_file_name_is_indexed_served_and_returned_losslessly(tmp_path, fake_model, capsys):
    pics = colour_folder(tmp_path / "pics")
    odd = draw(pics / ODD, "red", (33, 31))
    out = tmp_path / "idx"
    assert main(_index_argv(pics, out)) == 0
    assert f"{len(NAMES) + 1} images indexed (0 unreadable" in capsys.readouterr().out

    index = SearchIndex(out)
    records = [r for r in MetadataStore(out).get(range(100)).values() if r.width == 33]
    assert len(records) == 1
    rec = records[0]
    assert os.fsencode(rec.path) == os.fsencode(str(odd.resolve()))  # the exact bytes of the name
    assert rec.public()["name"] == "name\\xffbad.png"  # printable, and says which byte it was
    assert index.image_bytes(rec.id)[0] == odd.read_bytes()

    client = TestClient(create_app(index, ColourEncoder()), base_url="http://127.0.0.1")
    r = client.get("/api/search", params={"q": "red", "k": 20})
    assert r.status_code == 200, r.text
    hit = next(h for h in r.json()["results"] if h["id"] == rec.id)
    assert hit["name"] == "name\\xffbad.png"
    image = client.get(hit["image_url"])
    assert image.status_code == 200 and image.content == odd.read_bytes()

    assert main(["search", str(out), "red", "-k", "20"]) == 0  # the table prints
    assert "name\\xffbad.png" in capsys.readouterr().out
    assert main(["search", str(out), "red", "-k", "20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    paths = [os.fsencode(row["path"]) for row in rows]
    assert os.fsencode(str(odd.resolve())) in paths  # --json: the path itself, losslessly

    counting = CountingEncoder()  # --add: the odd name is known, not embedded again
    report = build(BuildOptions(out=out, source=str(pics), add=True, progress=False), counting)
    assert counting.embedded == 0 and report.total == len(NAMES) + 1


def test_a_non_utf8_shard_member_is_indexed(tmp_path):
    import tarfile

    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, colour in ((os.fsdecode(b"k\xfe1.png"), "red"), ("k2.png", "blue")):
            data = _png(colour)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _build(shard, tmp_path / "idx")
    index = SearchIndex(tmp_path / "idx")
    hit = index.search(ColourEncoder().embed_texts(["red"]), 1)[0][0]
    assert os.fsencode(hit.record.member) == b"k\xfe1.png" and hit.record.public()["name"] == "k\\xfe1.png"
    assert index.image_bytes(hit.record.id)[0] == _png("red")


# ----------------------------------------------------------------------------- 3. NaN embeddings


class NaNEncoder(ColourEncoder):
    """A broken model: NaN for every purple picture."""

    name = "nan-model"

    def embed_images(self, pixels):
        out = super().embed_images(pixels)
        out[out.argmax(axis=1) == NAMES.index("purple")] = np.nan
        return out


def test_nan_embeddings_are_refused_naming_the_model_and_the_image(tmp_path, fake_model, capsys):
    pics = colour_folder(tmp_path / "pics")
    fake_model["enc"] = NaNEncoder()
    assert main(_index_argv(pics, tmp_path / "idx", "--chunk-size", "3")) == 2
    _one_line_error(capsys, "index", "nan-model", "purple-0.png", "chunk", "NaN")
    assert IndexFolder(tmp_path / "idx").read_info().get("status") != "ready"
    with pytest.raises(ValueError, match="not finished"):
        SearchIndex(tmp_path / "idx")


def test_a_model_with_one_nan_weight_is_refused(tmp_path):
    from mammut.apps.encoder import ModelEncoder

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)

        def embed_image(self, pixels):
            return torch.nn.functional.normalize(self.proj(pixels.mean(dim=(2, 3))), dim=-1)

        def embed_text(self, ids):
            return torch.nn.functional.normalize(self.proj(ids.float()[:, :3]), dim=-1)

    model = Tiny()
    with torch.no_grad():
        model.proj.weight[0, 0] = float("nan")
    enc = ModelEncoder(model, lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((8, 8)), np.float32)
                                                          ).permute(2, 0, 1) / 255, lambda t: torch.ones(len(t), 3),
                       None, name="/runs/broken")
    with pytest.raises(ValueError, match=r"--model: /runs/broken gave non-finite .*NaN.* chunk 0"):
        _build(colour_folder(tmp_path / "pics"), tmp_path / "idx", enc)


# ----------------------------------------------------------------------------- 4. one writer per index folder

_HOLD = """
import sys, time
from mammut.io.runlock import FolderLock
FolderLock(sys.argv[1], what="index folder").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_index_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, fake_model, capsys):
    pics = colour_folder(tmp_path / "pics")
    out = tmp_path / "idx"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_index_argv(pics, out)) == 2
        _one_line_error(capsys, "index", f"PID {holder.pid}", str(out))
        assert not IndexFolder(out).exists()  # nothing written
        from mammut.io.runlock import FolderLocked

        with pytest.raises(FolderLocked, match=f"PID {holder.pid}"):
            _build(pics, out)
    finally:
        holder.kill()
        holder.wait()
    assert main(_index_argv(pics, out)) == 0  # the dead holder's lock is taken over
    assert (out / ".lock").exists() and SearchIndex(out).size == len(NAMES)
    draw(pics / "late.png", "red")
    assert main(["index", "--add", "--out", str(out), "--no-progress"]) == 0  # .lock confuses nothing
    assert SearchIndex(out).size == len(NAMES) + 1


# ----------------------------------------------------------------------------- 6. serve only the indexed file


@pytest.fixture()
def served(tmp_path):
    pics = colour_folder(tmp_path / "pics")
    (pics / "secret.txt").write_text("not to be served")
    _build(pics, tmp_path / "idx")
    index = SearchIndex(tmp_path / "idx")
    client = TestClient(create_app(index, ColourEncoder()), base_url="http://127.0.0.1")
    red = client.get("/api/search", params={"q": "red", "k": 1}).json()["results"][0]
    assert red["name"] == "red-0.png"
    return pics, tmp_path / "idx", client, red["id"]


def test_a_symlink_swapped_in_after_indexing_is_not_served(served):
    pics, _, client, red = served
    original = (pics / "red-0.png").read_bytes()
    assert client.get(f"/api/images/{red}").content == original
    (pics / "red-0.png").rename(pics / "red-0.bak")
    (pics / "red-0.png").symlink_to(pics / "secret.txt")
    for r in (client.get(f"/api/images/{red}"), client.post(f"/api/images/{red}/caption")):
        assert r.status_code == 410 and b"not to be served" not in r.content, r.text
        assert f"image {red}" in r.json()["detail"] and "mammut index" in r.json()["detail"]
    (pics / "red-0.png").unlink()  # a symlink to the very image is not the file that was indexed either
    (pics / "red-0.png").symlink_to(pics / "red-0.bak")
    assert client.get(f"/api/images/{red}").status_code == 410
    (pics / "red-0.png").unlink()
    (pics / "red-0.bak").rename(pics / "red-0.png")  # the file itself back: served again
    r = client.get(f"/api/images/{red}")
    assert r.status_code == 200 and r.content == original


def test_a_replaced_file_is_not_served(served):
    pics, _, client, red = served
    (pics / "red-0.png").unlink()
    (pics / "red-0.png").write_bytes(_png("blue"))  # another picture under the indexed name
    r = client.get(f"/api/images/{red}")
    assert r.status_code == 410 and r.content != _png("blue")
    (pics / "red-0.png").write_text("not an image at all")
    assert client.get(f"/api/images/{red}").status_code == 410


def test_without_a_recorded_identity_a_link_or_a_non_image_is_still_refused(served):
    pics, idx, client, red = served
    db = sqlite3.connect(idx / "metadata.sqlite")  # as an index written before identities were kept
    db.execute("ALTER TABLE items DROP COLUMN identity")
    db.commit()
    db.close()
    client = TestClient(create_app(SearchIndex(idx), ColourEncoder()), base_url="http://127.0.0.1")
    assert client.get(f"/api/images/{red}").status_code == 200
    (pics / "red-0.png").rename(pics / "red-0.bak")
    (pics / "red-0.png").symlink_to(pics / "secret.txt")
    r = client.get(f"/api/images/{red}")
    assert r.status_code == 410 and b"not to be served" not in r.content
    (pics / "red-0.png").unlink()
    (pics / "red-0.png").write_text("not to be served, either")
    r = client.get(f"/api/images/{red}")
    assert r.status_code == 410 and b"not to be served" not in r.content


def test_the_media_type_is_the_images_own(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "really-a-jpeg.png").write_bytes(_png("green", fmt="JPEG"))
    _build(pics, tmp_path / "idx")
    client = TestClient(create_app(SearchIndex(tmp_path / "idx"), ColourEncoder()), base_url="http://127.0.0.1")
    r = client.get("/api/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-content-type-options"] == "nosniff"


# ----------------------------------------------------------------------------- 9. IPv6 Host headers


def test_a_bracketed_ipv6_host_is_accepted(served):
    _, idx, client, _ = served
    for host in ("[::1]:8000", "[::1]", "[::1]:80"):
        assert client.get("/api/info", headers={"Host": host}).status_code == 200, host
    for host in ("[::2]:8000", "[::1", "[::1]x", "attacker.example", "[attacker.example]"):
        assert client.get("/api/info", headers={"Host": host}).status_code == 400, host
    v6 = TestClient(create_app(SearchIndex(idx), ColourEncoder(), allowed_hosts=default_allowed_hosts("fd00::5")),
                    base_url="http://127.0.0.1")
    assert v6.get("/api/info", headers={"Host": "[fd00::5]:8000"}).status_code == 200
    assert v6.get("/api/info", headers={"Host": "[FD00::5]"}).status_code == 200
    assert default_allowed_hosts("[::1]") == default_allowed_hosts("::1")


def test_serve_on_ipv6_prints_a_bracketed_url(served, fake_model, monkeypatch, capsys):
    import uvicorn

    _, idx, _, _ = served
    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    assert main(["serve", str(idx), "--host", "::1"]) == 0
    assert "http://[::1]:8000" in capsys.readouterr().out and calls["host"] == "::1"
    client = TestClient(calls["app"], base_url="http://127.0.0.1")
    assert client.get("/api/info", headers={"Host": "[::1]:8000"}).status_code == 200


# ----------------------------------------------------------------------------- 10. a full disk, stray temp files


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path, fake_model, capsys, monkeypatch):
    pics = colour_folder(tmp_path / "pics")
    out = tmp_path / "idx"
    fsync = os.fsync

    def full(fd):
        if ".000001.npy." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert main(_index_argv(pics, out, "--chunk-size", "3")) == 2
    _one_line_error(capsys, "index", "no space left", str(out / "chunks" / "000001.npy"))
    assert not [p for p in out.rglob("*.tmp")]
    monkeypatch.setattr(os, "fsync", fsync)
    assert main(_index_argv(pics, out, "--chunk-size", "3")) == 0  # resumes
    assert SearchIndex(out).size == len(NAMES)


def test_a_full_disk_in_sqlite_is_one_line_naming_the_file(tmp_path, fake_model, capsys, monkeypatch):
    pics = colour_folder(tmp_path / "pics")

    def full(self, *a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(MetadataStore, "mark_chunk", full)
    assert main(_index_argv(pics, tmp_path / "idx")) == 2
    _one_line_error(capsys, "index", "disk is full", str(tmp_path / "idx" / "metadata.sqlite"))


def test_stray_temp_files_are_removed_by_the_next_run(tmp_path, fake_model, capsys):
    pics = colour_folder(tmp_path / "pics")
    out = tmp_path / "idx"
    assert main(_index_argv(pics, out)) == 0
    stray = [out / ".000000.npy.4194000.tmp", out / ".index.json.1.tmp", out / "chunks" / ".000000.json.99999.tmp",
             out / "chunks" / f".000000.npy.{os.getpid()}.tmp", out / "index.faiss.tmp"]
    for p in stray:
        p.write_bytes(b"half")
    def files():  # (SQLite's own -wal/-shm files come and go)
        return sorted(p.relative_to(out) for p in out.rglob("*") if p not in stray and "sqlite-" not in p.name)

    keep = files()
    assert main(_index_argv(pics, out)) == 0  # up to date: still cleans
    assert not any(p.exists() for p in stray)
    assert files() == keep and (out / ".lock").exists()
    assert SearchIndex(out).size == len(NAMES)


# ----------------------------------------------------------------------------- 11. a damaged metadata store


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_a_damaged_metadata_store_is_one_line_on_search_and_serve(tmp_path, fake_model, capsys, monkeypatch, cut):
    import uvicorn

    pics = colour_folder(tmp_path / "pics", copies=20)
    out = tmp_path / "idx"
    _build(pics, out)
    db = out / "metadata.sqlite"
    data = db.read_bytes()
    db.write_bytes(data[:int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(ValueError, match="metadata.sqlite"):
        SearchIndex(out)
    assert main(["search", str(out), "red"]) == 2
    _one_line_error(capsys, "search", str(db), "mammut index")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", str(out)]) == 2
    _one_line_error(capsys, "serve", str(db), "mammut index")
    assert not calls  # the server did not start


# ----------------------------------------------------------------------------- 13. stalled bodies, limits


def _scope(path: str = "/api/caption") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=b"),
                        (b"content-length", b"5000")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}


def test_a_stalled_request_body_is_answered_408(served):
    _, idx, _, _ = served
    app = create_app(SearchIndex(idx), ColourEncoder(), body_timeout=0.2)
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    for path in ("/api/caption", "/api/search/image"):
        pulled, sent = [], []

        async def receive():
            pulled.append(1)
            if len(pulled) == 1:
                return {"type": "http.request", "body": head, "more_body": True}
            await asyncio.sleep(3600)  # the client stalls
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        asyncio.run(asyncio.wait_for(app(_scope(path), receive, send), 60))
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408, sent
        assert (b"connection", b"close") in sent[0]["headers"]
        assert "0.2" in json.loads(b"".join(m.get("body", b"") for m in sent))["detail"]
    client = TestClient(app, base_url="http://127.0.0.1")  # a body that arrives is read as before
    r = client.post("/api/caption", files={"file": ("q.png", _png("blue"), "image/png")})
    assert r.status_code == 200 and r.json()["caption"] == "a blue picture"
    with pytest.raises(ValueError, match=r"--body-timeout: expected a number of seconds > 0, got 0"):
        create_app(SearchIndex(idx), ColourEncoder(), body_timeout=0)


def test_serve_passes_its_timeouts_and_connection_limit_to_uvicorn(served, fake_model, monkeypatch, capsys):
    import uvicorn

    _, idx, _, _ = served
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", str(idx)]) == 0
    assert calls[-1]["timeout_keep_alive"] == 5 and calls[-1]["limit_concurrency"] == 64
    assert main(["serve", str(idx), "--timeout-keep-alive", "2", "--limit-concurrency", "10",
                 "--body-timeout", "3"]) == 0
    assert calls[-1]["timeout_keep_alive"] == 2 and calls[-1]["limit_concurrency"] == 10
    capsys.readouterr()
    for flag, value in (("--timeout-keep-alive", "0"), ("--limit-concurrency", "0"), ("--body-timeout", "-1")):
        assert main(["serve", str(idx), flag, value]) == 2
        _one_line_error(capsys, "serve", flag, value)
    assert len(calls) == 2


# ----------------------------------------------------------------------------- precision


def test_precision_flag_with_bf16_as_its_alias():
    from mammut.cli import _parser

    p = _parser()
    for cmd in (["index", "src", "--out", "o"], ["search", "d", "q"], ["serve", "d"]):
        assert p.parse_args(cmd).precision == "auto"
        assert p.parse_args([*cmd, "--bf16"]).precision == "bf16"
        assert p.parse_args([*cmd, "--precision", "fp32"]).precision == "fp32"
        with pytest.raises(SystemExit):
            p.parse_args([*cmd, "--precision", "fp16"])


@pytest.mark.filterwarnings("ignore:precision bf16")
def test_the_encoder_takes_a_precision_and_still_bf16():
    from mammut.apps.encoder import ModelEncoder
    from mammut.precision import Precision, resolve_precision

    class Tiny(torch.nn.Module):
        def embed_image(self, pixels):
            self.dtype_seen = torch.ones(1, 1) @ torch.ones(1, 1)
            return torch.nn.functional.normalize(pixels.mean(dim=(2, 3)), dim=-1)

        def embed_text(self, ids):
            return ids.float()

    def make(**kw):
        return ModelEncoder(Tiny(), lambda im: im, lambda t: t, None, name="m", **kw)

    assert make().precision.name == "fp32" and not make().bf16
    old = make(bf16=True)
    assert old.bf16 and old.precision.name == "bf16"
    old.embed_images(torch.rand(1, 3, 4, 4))
    assert old.model.dtype_seen.dtype == torch.bfloat16  # bf16 autocast did run
    assert make(precision="fp32").precision.name == "fp32"
    chosen = resolve_precision("auto", "cpu")
    enc = make(precision=chosen)
    assert isinstance(enc.precision, Precision) and enc.precision == chosen
    enc.embed_images(torch.rand(1, 3, 4, 4))
    assert enc.model.dtype_seen.dtype == (torch.bfloat16 if chosen.bf16 else torch.float32)
    with pytest.raises(ValueError, match="precision: expected one of auto, fp32, bf16, got 'fp16'"):
        make(precision="fp16")


@pytest.mark.filterwarnings("ignore:precision bf16")
def test_the_chosen_precision_is_recorded_in_index_json(tmp_path, monkeypatch):
    from mammut.apps import encoder as encoder_module

    seen = {}

    def fake_load(source, **kw):
        seen.update(kw)
        enc = ColourEncoder()
        enc.name = "colour-encoder"
        from mammut.precision import resolve_precision

        enc.precision = resolve_precision(kw["precision"], kw.get("device") or "cpu")
        return enc

    monkeypatch.setattr(encoder_module, "load_encoder", fake_load)
    pics = colour_folder(tmp_path / "pics")
    assert main(_index_argv(pics, tmp_path / "a", "--bf16")) == 0
    assert seen["precision"] == "bf16"
    info = IndexFolder(tmp_path / "a").read_info()
    assert info["model"] == "colour-encoder" and info["precision"] == "bf16"
    assert info["precision_requested"] == "bf16" and info["precision_reason"]
    assert main(_index_argv(pics, tmp_path / "b")) == 0
    info = IndexFolder(tmp_path / "b").read_info()
    assert info["precision_requested"] == "auto" and info["precision"] in ("fp32", "bf16")
    assert info["precision_reason"].startswith("auto: ")
    assert IndexFolder(tmp_path / "b").read_chunk(0)["precision"] == info["precision"]


@pytest.mark.filterwarnings("ignore:precision bf16")
def test_load_encoder_logs_its_precision_with_the_reason(tmp_path, monkeypatch, caplog):
    import logging

    import mammut.loading
    from mammut.apps.encoder import load_encoder

    class Tiny(torch.nn.Module):
        def embed_image(self, pixels):
            return pixels.mean(dim=(2, 3))

        def embed_text(self, ids):
            return ids.float()

    monkeypatch.setattr(mammut.loading, "load", lambda *a, **k: (Tiny(), lambda im: im, lambda t: t))
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.INFO, logger="mammut.apps.encoder"):
        enc = load_encoder(tmp_path / "run", precision="fp32")
    assert enc.precision.name == "fp32"
    assert any("precision fp32" in r.getMessage() and "fp32 requested" in r.getMessage() for r in caplog.records)
    assert load_encoder(tmp_path / "run").precision.requested == "auto"  # the default
    assert load_encoder(tmp_path / "run", bf16=True).precision.name == "bf16"  # the old keyword
    with pytest.raises(ValueError, match="precision: expected one of auto, fp32, bf16, got 'half'"):
        load_encoder(tmp_path / "run", precision="half")

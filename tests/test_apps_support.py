"""Helpers of the search-application tests (``test_apps_*``): an encoder whose embeddings are
known (so "the right image first" is a fact, not a hope), collections of drawn pictures, and a
tiny trained run. Its own tests check that the encoder means what the other tests rely on."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

PALETTE = {"red": (220, 30, 30), "green": (30, 190, 50), "blue": (30, 50, 220), "yellow": (235, 215, 30),
           "purple": (130, 40, 170), "orange": (245, 140, 20), "black": (15, 15, 15), "white": (245, 245, 245)}
NAMES = list(PALETTE)


class ColourEncoder:
    """Embeds a picture by how close its mean colour is to each palette colour, and a text by
    the palette words it contains; captions name the nearest palette colour. Picklable."""

    name = "colour-encoder"

    def __init__(self, size: int = 16, width: float = 0.02) -> None:
        self.size, self.width = size, width  # width: how far a colour's match reaches (squared distance)
        self._palette = torch.tensor([PALETTE[n] for n in NAMES], dtype=torch.float32) / 255.0

    @property
    def dim(self) -> int:
        return len(NAMES)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        mean = pixels.float().mean(dim=(2, 3))  # (n, 3)
        dist = torch.cdist(mean, self._palette)  # (n, colours)
        vec = torch.exp(-(dist**2) / self.width)
        return torch.nn.functional.normalize(vec, dim=1).numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = np.full((len(texts), self.dim), 1e-3, np.float32)
        for i, text in enumerate(texts):
            for j, name in enumerate(NAMES):
                if name in text.lower():
                    out[i, j] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def caption(self, pixels: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        best = self.embed_images(pixels).argmax(axis=1)
        return [f"a {NAMES[j]} picture" for j in best]


class BlockingEncoder(ColourEncoder):
    """Embeds ``calls`` batches, then touches ``blocked`` and waits forever (to be killed);
    appends the number of images of every batch it embeds to ``log``."""

    def __init__(self, calls: int, blocked: str, log: str) -> None:
        super().__init__()
        self.calls, self.blocked, self.log = calls, blocked, log

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        if self.calls == 0:
            Path(self.blocked).touch()
            while True:
                time.sleep(3600)
        self.calls -= 1
        with open(self.log, "a") as fh:
            fh.write(f"{len(pixels)}\n")
        return super().embed_images(pixels)


class CountingEncoder(ColourEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.embedded = 0

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        self.embedded += len(pixels)
        return super().embed_images(pixels)


def draw(path: Path, colour: str, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, PALETTE[colour])
    img.save(path)
    return path


def colour_folder(root: Path, copies: int = 1, corrupt: int = 0) -> Path:
    """``root/<colour>-<i>.png`` (every other in a subfolder), plus ``corrupt`` files that are not images."""
    for c, name in enumerate(NAMES):
        for i in range(copies):
            sub = "nested/" if (c + i) % 2 else ""
            draw(root / f"{sub}{name}-{i}.png", name, (20 + c, 16 + i))
    for i in range(corrupt):
        (root / f"broken-{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def train_tiny(out: Path) -> Path:
    """A tiny MaMMUT run (2 steps of the packaged tiny preset): a real model for the CLI and API."""
    cmd = [sys.executable, "-m", "mammut.cli", "train", "--config", "tiny", "--train.out_dir", str(out),
           "--train.steps", "2", "--train.report", "false", "--train.threads", "1", "--train.progress", "false",
           "--train.tensorboard", "false"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free loopback port in a thread; yields its URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


# ----------------------------------------------------------------------------- the helpers' own tests


def test_colour_encoder_ranks_the_named_colour_first(tmp_path):
    enc = ColourEncoder()
    pics = torch.stack([enc.preprocess(Image.open(draw(tmp_path / f"{n}.png", n))) for n in NAMES])
    img = enc.embed_images(pics)
    txt = enc.embed_texts([f"a {n} thing" for n in NAMES])
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    assert (np.argmax(txt @ img.T, axis=1) == np.arange(len(NAMES))).all()
    assert enc.caption(pics) == [f"a {n} picture" for n in NAMES]


def test_blocking_encoder_blocks_after_its_calls(tmp_path):
    enc = BlockingEncoder(1, str(tmp_path / "blocked"), str(tmp_path / "log"))
    enc.embed_images(torch.zeros(2, 3, 4, 4))
    assert (tmp_path / "log").read_text() == "2\n" and not (tmp_path / "blocked").exists()
    assert enc.calls == 0  # the next call would block

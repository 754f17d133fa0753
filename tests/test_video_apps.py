"""Videos in use: ``mammut index`` over a folder of videos with a video model (search by text,
the page's frame strips, captions of indexed videos) and ``mammut caption clip.mp4`` /
``mammut embed --videos`` with a video run; an image-only run refuses videos clearly."""

from __future__ import annotations

import io
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av", reason="the video extra (PyAV) is not installed")

from mammut.apps.build import BuildOptions, build  # noqa: E402
from mammut.apps.searcher import SearchIndex  # noqa: E402
from mammut.cli import main  # noqa: E402
from mammut.data.video_files import read_clip_with_stats, write_video  # noqa: E402
from test_apps_support import PALETTE, ColourEncoder  # noqa: E402

QUIET = ["--no-progress"]


def colour_video(path: Path, colour: str, *, size: tuple[int, int] = (24, 40), frames: int = 12,
                 codec: str = "mpeg4") -> Path:
    """The first quarter of the frames black, the rest ``colour`` (h, w = size)."""
    arr = np.zeros((frames, *size, 3), np.uint8)
    arr[frames // 4:] = PALETTE[colour]
    return write_video(path, arr, fps=6, codec=codec)


class ColourVideoEncoder(ColourEncoder):
    """ColourEncoder for clips: a video model (``media == "video"``) that embeds a clip by the mean
    colour of its last frame, so the clip's frames must arrive in order."""

    name = "colour-video-encoder"
    media = "video"
    clip_shape = (4, 16)

    def read_video(self, data: bytes, where: str) -> tuple[torch.Tensor, tuple[int, int]]:
        clip, stats = read_clip_with_stats(data, frames=4, image_size=16, where=where)
        return clip, stats["size"]

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        if pixels.ndim == 5:
            assert pixels.shape[1:] == (4, 3, 16, 16)
            pixels = pixels[:, -1]
        return super().embed_images(pixels)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    colour_video(root / "red.mp4", "red")
    colour_video(root / "nested" / "blue.webm", "blue", codec="libvpx-vp9")
    colour_video(root / "green.mkv", "green", size=(32, 32))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x01" * 200)
    Image.new("RGB", (20, 20), PALETTE["yellow"]).save(root / "photo.png")  # not a video: not indexed
    return root


def test_a_folder_of_videos_is_indexed_searched_and_shown_as_strips(videos: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from mammut.apps.server import create_app

    report = build(BuildOptions(out=tmp_path / "idx", source=str(videos), chunk_size=2, progress=False),
                   ColourVideoEncoder())
    assert (report.total, report.total_corrupt) == (3, 1)
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["media"] == "video"
    index = SearchIndex(tmp_path / "idx")
    client = TestClient(create_app(index, ColourVideoEncoder()), base_url="http://127.0.0.1")
    for colour, name in (("blue", "blue.webm"), ("red", "red.mp4"), ("green", "green.mkv")):
        first = client.get("/api/search", params={"q": f"a {colour} clip", "k": 3}).json()["results"][0]
        assert first["name"] == name
    first = client.get("/api/search", params={"q": "red", "k": 1}).json()["results"][0]
    assert (first["width"], first["height"]) == (40, 24)  # the video's frame size
    strip = client.get(first["image_url"])
    assert strip.status_code == 200 and strip.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(strip.content)).convert("RGB")
    width = round(96 * 40 / 24)
    assert picture.size == (5 * width + 4 * 4, 96)  # 5 frames at the video's aspect ratio, 4 px apart
    first_frame, last_frame = picture.getpixel((width // 2, 48)), picture.getpixel((4 * (width + 4) + width // 2, 48))
    assert max(first_frame) < 40 and np.abs(np.subtract(last_frame, PALETTE["red"])).max() < 40
    r = client.post(f"/api/images/{first['id']}/caption")
    assert r.status_code == 200 and r.json()["caption"] == "a red picture"  # the clip, last frame red
    page = client.get("/").text
    assert "card.classList.add(\"video\")" in page and "Caption this video" in page


def test_mammut_index_and_search_with_a_real_video_model(videos: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ck = _video_checkpoint(tmp_path)
    assert main(["index", str(videos), "--out", str(tmp_path / "idx"), "--model", str(ck), "--precision", "fp32",
                 *QUIET]) == 0
    out = capsys.readouterr().out
    assert "3" in out
    assert main(["search", str(tmp_path / "idx"), "a red clip", "--json", "-k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)
    names = sorted(h["name"] for h in (hits["results"] if isinstance(hits, dict) else hits))
    assert names == ["blue.webm", "green.mkv", "red.mp4"]
    assert main(["search", str(tmp_path / "idx"), "--image", str(videos / "photo.png"), "-k", "1"]) == 0  # still clip


def _video_checkpoint(root: Path) -> Path:
    import mammut
    from mammut.models.mammut import MaMMUTConfig
    from mammut.tokenizer import train_bpe

    tok = train_bpe(["a red clip", "a blue clip"] * 4, vocab_size=300)
    tok.context_length = 12
    torch.manual_seed(0)
    cfg = MaMMUTConfig(dim=32, num_tokens=tok.vocab_size, depth=1, heads=2, dim_head=16, bos_id=tok.bos_id,
                       eos_id=tok.eos_id, encoder={"type": "video_tube", "frames": 8, "frame_stride": 4,
                                                   "tubes": (((4, 8, 8), (4, 16, 16), (0, 0, 0)),),
                                                   "vit": dict(image_size=32, patch_size=8, dim=48, depth=1, heads=2,
                                                               dim_head=16)})
    folder = root / "ck"
    mammut.MaMMUT(cfg).save_pretrained(folder, preprocess=mammut.ImagePreprocess(32), tokenizer=tok)
    return folder


def _train(out: Path, config: str) -> Path:
    assert main(["train", "--config", config, "--train.out_dir", str(out), "--train.steps", "1", "--train.threads",
                 "1", "--train.progress", "false", "--train.report", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def video_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("video-run") / "run", "video-tiny")


def test_caption_and_embed_video_files_with_a_video_run(video_run: Path, videos: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(videos / "red.mp4"), str(videos / "nested" / "blue.webm")]
    assert main(["caption", *files, "--run", str(video_run), "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert main(["embed", "--videos", *files, "--run", str(video_run), "--out", str(tmp_path / "e.npy"),
                 "--precision", "fp32"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    # the same clip through the library: what embed wrote is the model's embedding of the sampled frames
    from mammut.data.video_files import read_clip
    from mammut.inference import load_run, run_preprocess

    run = load_run(video_run)
    clip = read_clip(files[0], frames=8, image_size=32, preprocess=run_preprocess(32, run.config.data.normalize))
    with torch.no_grad():
        want = torch.nn.functional.normalize(run.model.embed_image(clip[None]).float(), dim=-1)
    np.testing.assert_allclose(emb[0], want[0].numpy(), atol=1e-5)


def test_video_and_image_mismatches_are_one_line_errors(video_run: Path, videos: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    image_run = _train(tmp_path / "image-run", "tiny")
    cases = [
        (["caption", str(videos / "red.mp4"), "--run", str(image_run)], "has a model that takes only images"),
        (["embed", "--videos", str(videos / "red.mp4"), "--run", str(image_run), "--out", str(tmp_path / "x.npy")],
         "has a model that takes only images"),
        (["caption", str(videos / "photo.png"), "--run", str(video_run)], "has a video model: expected video files"),
        (["caption", str(videos / "photo.png"), str(videos / "red.mp4"), "--run", str(video_run)],
         "expected all images or all videos"),
        (["caption", str(videos / "broken.mp4"), "--run", str(video_run)], "broken.mp4: not a readable video"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mammut {argv[0]}: error:") and message in err[0], err
    # an image model indexing a folder of videos indexes its images, as before
    assert main(["index", str(videos), "--out", str(tmp_path / "img-idx"), "--model", str(image_run), *QUIET]) == 0
    assert SearchIndex(tmp_path / "img-idx").size == 1

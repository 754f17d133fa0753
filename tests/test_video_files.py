"""Real video files (mammut.data.video_files): frames sampled by seeking, at the right times,
from mp4 / webm files written here with PyAV; bad files skipped, counted and named."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="the video extra (PyAV) is not installed")

from mammut.data.datasets import image_transform  # noqa: E402
from mammut.data.video_files import (  # noqa: E402
    SkippedVideos, VideoCsv, VideoDecodeError, clip_times, read_clip, read_clip_with_stats,
    video_shard_samples, write_video,
)

BITS = 6
SIZE = 48  # 6 stripes of 8 px: frame i shows the bits of i, white = 1


def coded_frames(n: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """(n, height, width, 3) uint8: frame i has BITS vertical stripes, stripe b white iff bit b of i."""
    out = np.zeros((n, height, width, 3), np.uint8)
    stripe = width // BITS
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                out[i, :, b * stripe:(b + 1) * stripe] = 255
    return out


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """The frame index coded in each frame of a square clip (t, 3, s, s) of coded_frames."""
    s = clip.shape[-1]
    stripe = s / BITS
    cols = [int((b + 0.5) * stripe) for b in range(BITS)]
    return [sum(1 << b for b, c in enumerate(cols) if float(f[:, s // 2, c].mean()) > 0.5) for f in clip]


CODECS = [("mpeg4", "mp4"), ("libx264", "mp4"), ("libvpx-vp9", "webm")]
available = [c for c in CODECS if c[0] in av.codecs_available]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {codec: write_video(d / f"c-{codec}.{ext}", coded_frames(50), fps=10, codec=codec) for codec, ext in available}
    return out


def test_the_wheel_has_an_mp4_and_a_webm_encoder() -> None:
    assert "mpeg4" in av.codecs_available and "libvpx-vp9" in av.codecs_available


@pytest.mark.parametrize("codec", [c for c, _ in available])
def test_uniform_and_strided_frames_are_the_ones_shown_at_their_times(files: dict[str, Path], codec: str) -> None:
    clip = read_clip(files[codec], frames=4, image_size=24)
    assert clip.shape == (4, 3, 24, 24) and clip.dtype == torch.float32
    # 50 frames at 10 fps = 5 s; uniform centres 0.625, 1.875, 3.125, 4.375 s -> frames 6, 18, 31, 43
    assert frame_numbers(clip) == [6, 18, 31, 43]
    strided = read_clip(files[codec], frames=4, image_size=24, sampling="stride", stride=3)
    # 4 frames 0.3 s apart centred in 5 s: 2.05, 2.35, 2.65, 2.95 s
    assert frame_numbers(strided) == [20, 23, 26, 29]


def test_frames_go_through_the_runs_image_preprocessing(files: dict[str, Path]) -> None:
    from PIL import Image

    clip, stats = read_clip_with_stats(files["mpeg4"], frames=1, image_size=16)
    with av.open(str(files["mpeg4"])) as c:
        frame = next(f for f in c.decode(video=0) if f.time >= 2.5 - 1e-6)
    expected = image_transform(16)(frame.to_image())
    assert isinstance(frame.to_image(), Image.Image)
    torch.testing.assert_close(clip[0], expected)
    assert stats["size"] == (SIZE, SIZE) and stats["duration"] == pytest.approx(5.0)


def test_a_long_file_is_sampled_by_seeking_not_decoded_whole(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", coded_frames(600), fps=25, codec="mpeg4", gop=25)
    clip, stats = read_clip_with_stats(path, frames=4, image_size=24)
    assert stats["decoded"] < 4 * 26  # at most a keyframe interval per wanted frame, of 600
    assert frame_numbers(clip) == [n % 64 for n in (75, 225, 375, 525)]


def test_variable_frame_rate_and_odd_sizes(tmp_path: Path) -> None:
    times = [0.0, 0.1, 0.15, 0.5, 0.55, 2.0, 2.1, 3.0]
    path = write_video(tmp_path / "vfr.mp4", coded_frames(8), times=times)
    clip, stats = read_clip_with_stats(path, frames=4, image_size=24)
    # 3.1 s (the last frame lasts 1 / average rate); wanted 0.39, 1.16, 1.94, 2.71 s
    assert stats["times"] == pytest.approx([0.3875, 1.1625, 1.9375, 2.7125])
    assert frame_numbers(clip) == [2, 4, 4, 6]
    wide = write_video(tmp_path / "wide.webm", coded_frames(5, 30, 101), codec="libvpx-vp9")
    clip, stats = read_clip_with_stats(wide, frames=2, image_size=SIZE)
    assert clip.shape == (2, 3, SIZE, SIZE)  # resized and centre-cropped like images
    assert stats["size"] == (100, 30)  # yuv420p: written at even sizes


def test_a_clip_shorter_than_its_frames_repeats_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "short.mp4", coded_frames(3), fps=10)
    assert frame_numbers(read_clip(path, frames=6, image_size=24)) == [0, 0, 1, 1, 2, 2]
    assert frame_numbers(read_clip(path, frames=4, image_size=24, sampling="stride", stride=4)) == [2, 2, 2, 2]


def test_clip_times_and_bad_arguments() -> None:
    assert clip_times(0.0, 4.0, 10, frames=4) == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert clip_times(1.0, 4.0, 10, frames=2, sampling="stride", stride=5) == pytest.approx([2.75, 3.25])
    with pytest.raises(ValueError, match="frames: expected an int >= 1, got 0"):
        read_clip("x.mp4", frames=0, image_size=8)
    with pytest.raises(ValueError, match="stride: expected an int >= 1 with sampling='stride'"):
        read_clip("x.mp4", frames=2, image_size=8, sampling="stride")
    with pytest.raises(ValueError, match="sampling: expected one of"):
        read_clip("x.mp4", frames=2, image_size=8, sampling="random")


def test_corrupt_truncated_and_missing_files_raise_naming_them(tmp_path: Path, files: dict[str, Path]) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoDecodeError, match="junk.mp4: not a readable video"):
        read_clip(junk, frames=2, image_size=8)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(files["mpeg4"].read_bytes()[:300])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        read_clip(cut, frames=2, image_size=8)
    audio = tmp_path / "audio.wav"
    with av.open(str(audio), "w") as c:  # a real media file without a video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(VideoDecodeError, match="audio.wav: no video stream"):
        read_clip(audio, frames=2, image_size=8)
    with pytest.raises(FileNotFoundError, match="nope.mp4: no such video file"):
        read_clip(tmp_path / "nope.mp4", frames=2, image_size=8)
    assert isinstance(VideoDecodeError("x"), OSError)


def test_bytes_input_matches_the_file(files: dict[str, Path]) -> None:
    path = files["mpeg4"]
    torch.testing.assert_close(read_clip(path.read_bytes(), frames=3, image_size=16), read_clip(path, frames=3, image_size=16))


def test_video_csv_reads_clips_and_skips_bad_files_counting_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "a.mp4", coded_frames(20), fps=10)
    write_video(tmp_path / "clips" / "b.webm", coded_frames(30), fps=15, codec="libvpx-vp9")
    (tmp_path / "clips" / "bad.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "clips.csv").write_text(
        "filepath,title\nclips/a.mp4,a cat moves left\nclips/bad.mp4,broken\nclips/b.webm,\"a dog, then a cat\"\n"
        "clips/gone.mp4,missing\nclips/a.mp4,   \n", encoding="utf-8")
    ds = VideoCsv(tmp_path / "clips.csv", frames=3, image_size=16)
    assert len(ds) == 4 and ds.num_empty == 1
    clip, caption = ds[0]
    assert clip.shape == (3, 3, 16, 16) and caption == "a cat moves left"
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None and ds[3] is None
    assert ds[2][1] == "a dog, then a cat"
    assert ds.skipped == 2 and [Path(n).name for n in ds.skips.names] == ["bad.mp4", "gone.mp4"]
    assert "bad.mp4" in caplog.text and "gone.mp4" in caplog.text
    assert ds[1] is None and ds.skipped == 2  # counted once per file
    with pytest.raises(ValueError, match="caption_key='caption' is not a column"):
        VideoCsv(tmp_path / "clips.csv", frames=3, image_size=16, caption_key="caption")


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_video_shards_yield_clips_and_skip_bad_samples(tmp_path: Path, files: dict[str, Path]) -> None:
    mp4 = files["mpeg4"].read_bytes()
    webm = files["libvpx-vp9"].read_bytes() if "libvpx-vp9" in files else mp4
    _tar(tmp_path / "s-000.tar", {"a.mp4": mp4, "a.txt": b"a cat moves left", "b.webm": webm,
                                  "b.json": b'{"caption": "a dog appears"}', "c.mp4": b"junk" * 40, "c.txt": b"bad"})
    _tar(tmp_path / "s-001.tar", {"d/e.mp4": mp4, "d/e.txt": b"two swap", "f.txt": b"no video"})
    (tmp_path / "s-002.tar").write_bytes(b"not a tar")
    skips = SkippedVideos()
    got = list(video_shard_samples(str(tmp_path / "s-{000..002}.tar"), frames=2, image_size=16, skips=skips))
    assert [(c, k) for _, c, k in got] == [("a cat moves left", "a"), ("a dog appears", "b"), ("two swap", "d/e")]
    assert all(clip.shape == (2, 3, 16, 16) for clip, _, _ in got)
    assert skips.count == 3
    assert any("key c" in n for n in skips.names) and any("key f" in n for n in skips.names)
    assert any("s-002.tar" in n for n in skips.names)

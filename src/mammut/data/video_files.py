"""Real video files: decoding, frame sampling, a CSV of clips and WebDataset shards of clips.

Legend: ``t`` frames sampled per clip, ``H = W`` the image size, ``3`` RGB channels. A clip is a
float tensor ``(t, 3, H, W)``: each frame goes through the same eval preprocessing as an image of
a run (:class:`mammut.preprocess.ImagePreprocess`: short side resized bicubic, centre crop,
``[0, 1]``, no normalisation by default), so a video model sees frames exactly as its image model
saw images. Batches are ``(b, t, 3, H, W)``, the library's video layout.

* :func:`read_clip`: a video file (path or bytes) -> ``(t, 3, H, W)``, frames picked by **seeking**
  (the decoder jumps to the keyframe before each wanted time and decodes from there; frames far
  from the wanted times are never decoded), so a 10-minute file costs about what a 10-second one
  does. ``sampling="uniform"``: ``t`` frames at the centres of ``t`` equal spans of the clip;
  ``sampling="stride"``: ``t`` consecutive frames ``stride`` frames apart (at the stream's average
  frame rate), centred in the clip. Times, not frame numbers, are used throughout, so variable
  frame rates work; any frame size is resized. A clip too short for its ``t`` frames repeats its
  frames (the wanted times fall on the same frame) rather than failing.
* :class:`VideoCsv`: a CSV (``filepath,title``; relative paths against the CSV's folder) as a
  dataset of ``(clip, caption)``; an unreadable file gives ``None`` and is counted and named.
* :func:`video_shard_samples`: WebDataset tar shards whose samples have a ``.mp4``/``.webm``/...
  member and a ``.txt`` (or ``.json`` with ``caption``/``title``/``text``) caption, as
  ``(clip, caption, key)``; unreadable samples are skipped, counted and named.
* :func:`write_video`: frames -> a video file (tests, exporting clips).

Decoding uses PyAV (``pip install "mammut-vl[video]"``), imported only when a video is read or
written. PyAV's wheels bundle FFmpeg's libraries, so it installs anywhere pip does; torchcodec
needs the system's FFmpeg libraries, and torchvision's own video decoding is gone from the
torchvision we pin (removed in 0.26).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from ..preprocess import ImagePreprocess

log = logging.getLogger(__name__)

__all__ = [
    "VIDEO_EXTENSIONS",
    "SkippedVideos",
    "VideoCsv",
    "VideoDecodeError",
    "clip_times",
    "import_av",
    "is_video_file",
    "model_clip_shape",
    "read_clip",
    "read_clip_with_stats",
    "video_shard_samples",
    "write_video",
]

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "webm", "mkv", "mov", "avi", "m4v", "ogv")
SAMPLINGS: tuple[str, ...] = ("uniform", "stride")
_LOGGED_SKIPS = 20
# Decode forward instead of seeking when the next wanted frame is at most this many seconds ahead
# (a seek lands on a keyframe and decodes from there: for close frames, going on is cheaper).
_SEEK_GAP_S = 1.0


class VideoDecodeError(OSError):
    """A video file or blob that cannot be decoded (unreadable, no video stream, no frame); the
    message names it."""


def import_av() -> Any:
    """The ``av`` module (PyAV), or an ImportError saying how to install it."""
    try:
        import av
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError('reading video files needs PyAV: pip install "mammut-vl[video]" (or pip install av)') from err
    return av


def is_video_file(path: str | Path) -> bool:
    """Whether ``path`` names a video by its suffix (one of :data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lstrip(".").lower() in VIDEO_EXTENSIONS


def model_clip_shape(model: Any) -> tuple[int, int] | None:
    """``(frames, image_size)`` of the clips a model takes when its image encoder is a video encoder
    (a :class:`mammut.encoders.VideoTubeViT`), None for a model that takes only images."""
    from ..encoders.video import VideoTubeViT

    enc = getattr(model, "img_encoder", None)
    if not isinstance(enc, VideoTubeViT):
        return None
    return int(enc.config.frames), int(enc.vit.config.image_size)


def _check_args(frames: int, image_size: int, sampling: str, stride: int | None) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames: expected an int >= 1, got {frames!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "stride":
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride: expected an int >= 1 with sampling='stride', got {stride!r}")
    elif stride is not None:
        raise ValueError(f"stride: only used with sampling='stride', got stride={stride!r} with sampling={sampling!r}")


def clip_times(start: float, duration: float, fps: float, *, frames: int, sampling: str = "uniform",
               stride: int | None = None) -> list[float]:
    """The ``frames`` times (seconds, increasing) to sample in a clip of ``duration`` seconds from ``start``.

    ``uniform``: the centres of ``frames`` equal spans. ``stride``: ``frames`` times ``stride / fps``
    apart, centred in the clip (times past the end are clamped to it).
    """
    _check_args(frames, 1, sampling, stride)
    if sampling == "uniform":
        return [start + (i + 0.5) * duration / frames for i in range(frames)]
    assert stride is not None
    step = stride / fps
    window = step * frames
    first = start + max(0.0, (duration - window) / 2) + step / 2
    last = start + max(duration - 0.5 / fps, 0.0)
    return [min(first + i * step, last) for i in range(frames)]


def _label(source: str | Path | bytes, where: str | None) -> str:
    if where is not None:
        return where
    return "video bytes" if isinstance(source, (bytes, bytearray)) else str(source)


def _frame_time(frame: Any, index: int, fps: float) -> float:
    t = frame.time
    return float(t) if t is not None else index / fps


def _decode_at(container: Any, stream: Any, times: Sequence[float], label: str) -> tuple[list[Any], int]:
    """The frames shown at ``times`` (increasing, seconds): for each, the last frame starting at or
    before it. Seeks to the keyframe before a time when that skips frames: the time is more than
    :data:`_SEEK_GAP_S` ahead of the decoding position and past the next keyframe (once the
    keyframe interval has been seen); otherwise decodes on. Returns (PyAV frames, frames decoded)."""
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    base = stream.time_base or Fraction(1, 1_000_000)
    out: list[Any] = []
    decoded = 0
    it: Iterator[Any] | None = None
    prev: Any = None  # the last decoded frame at or before the wanted time
    ahead: Any = None  # a decoded frame past the previous wanted time, not yet used
    pos = -math.inf  # time of the last decoded frame
    ended = False
    seekable = True  # False once a seek lands on the keyframe of the seek before (sparse keyframes)
    landing = -math.inf  # time of the first frame decoded after the last seek
    last_key: float | None = None  # time of the last keyframe decoded since the last seek
    gop: float | None = None  # the keyframe interval last seen (seconds)

    def far(target: float, at: float) -> bool:
        if target <= at + _SEEK_GAP_S:
            return False
        return gop is None or last_key is None or target >= last_key + gop

    for target in times:
        if ahead is not None:
            ahead_time = _frame_time(ahead, decoded, fps)
            if ahead_time > target:  # the frame on screen at ``target`` is ``prev``
                out.append(prev)
                continue
            if not far(target, ahead_time):  # close: decode on from ``ahead``
                prev, ahead = ahead, None
        landed = False
        if it is None or (seekable and (ahead is not None or (not ended and far(target, pos)))):
            container.seek(max(int(target / base), 0), stream=stream, backward=True, any_frame=False)
            it, prev, ahead, ended, landed, last_key = container.decode(stream), None, None, False, True, None
        if ahead is not None:  # not seekable: decode on from ``ahead``
            prev, ahead = ahead, None
        while not ended:
            try:
                frame = next(it)
            except StopIteration:
                ended = True
                break
            decoded += 1
            pos = _frame_time(frame, decoded, fps)
            if landed:  # no later than the seek before: keyframes are sparse, decode on from now on
                landed, seekable = False, pos > landing
                landing = pos
            if frame.key_frame:
                if last_key is not None and pos > last_key:
                    gop = pos - last_key
                last_key = pos
            if pos <= target or prev is None:  # (a seek that lands past the target: take that frame)
                prev = frame
                if pos <= target:
                    continue
            else:
                ahead = frame
            break
        if prev is None:
            raise VideoDecodeError(f"{label}: no decodable frame at {target:.3f} s")
        out.append(prev)
    return out, decoded


def read_clip_with_stats(
    source: str | Path | bytes,
    *,
    frames: int,
    image_size: int,
    sampling: str = "uniform",
    stride: int | None = None,
    preprocess: ImagePreprocess | None = None,
    where: str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`read_clip` plus what it did: ``{"times": [...], "decoded": frames decoded,
    "duration": seconds, "fps": average rate, "size": (width, height)}``."""
    _check_args(frames, image_size, sampling, stride)
    label = _label(source, where)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise FileNotFoundError(f"{label}: no such video file")
    av = import_av()
    errors: tuple[type[BaseException], ...] = (av.error.FFmpegError, EOFError, ValueError, IndexError, UnicodeDecodeError)
    pre = preprocess.with_image_size(image_size) if preprocess is not None else ImagePreprocess(image_size)
    fp: Any = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with av.open(fp, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{label}: no video stream (streams: {[s.type for s in container.streams]})")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            base = stream.time_base
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            start = float(stream.start_time * base) if stream.start_time is not None and base else 0.0
            if stream.duration is not None and base:
                duration = float(stream.duration * base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000 - max(start, 0.0)
            elif stream.frames:
                duration = stream.frames / fps
            else:
                duration = 0.0
            if not duration > 0:  # unknown length: decode it once to learn it (rare; e.g. raw streams)
                count = sum(1 for _ in container.decode(stream))
                if count == 0:
                    raise VideoDecodeError(f"{label}: no video frame")
                duration = count / fps
            times = clip_times(start, duration, fps, frames=frames, sampling=sampling, stride=stride)
            picked, decoded = _decode_at(container, stream, times, label)
            size = (stream.codec_context.width, stream.codec_context.height)
            clip = torch.stack([pre(f.to_image()) for f in picked])
    except VideoDecodeError:
        raise
    except errors as err:
        raise VideoDecodeError(f"{label}: not a readable video ({type(err).__name__}: {err})") from err
    return clip, {"times": times, "decoded": decoded, "duration": duration, "fps": fps, "size": size}


def read_clip(
    source: str | Path | bytes,
    *,
    frames: int,
    image_size: int,
    sampling: str = "uniform",
    stride: int | None = None,
    preprocess: ImagePreprocess | None = None,
    where: str | None = None,
) -> torch.Tensor:
    """A video file (path or its bytes) -> float clip ``(frames, 3, image_size, image_size)``.

    ``sampling``: ``"uniform"`` (over the whole clip) or ``"stride"`` (``frames`` frames ``stride``
    frames apart, centred). ``preprocess``: the run's image preprocessing (default: runs' own,
    ``ImagePreprocess(image_size)``), used at ``image_size``. ``where`` names the source in errors.
    Raises :class:`VideoDecodeError` naming the file when it cannot be decoded,
    ``FileNotFoundError`` when it does not exist.
    """
    clip, _ = read_clip_with_stats(source, frames=frames, image_size=image_size, sampling=sampling, stride=stride,
                                   preprocess=preprocess, where=where)
    return clip


class SkippedVideos:
    """Count and names of the videos skipped as unreadable (the first 100 names are kept)."""

    def __init__(self, name: str = "video") -> None:
        self.name = name
        self.count = 0
        self.names: list[str] = []

    def add(self, what: str, reason: BaseException | str) -> None:
        self.count += 1
        if len(self.names) < 100:
            self.names.append(what)
        level = logging.WARNING if self.count <= _LOGGED_SKIPS else logging.DEBUG
        log.log(level, "%s: skipped %s (%s); %d skipped so far", self.name, what, reason, self.count)

    def __repr__(self) -> str:
        return f"SkippedVideos(name={self.name!r}, count={self.count})"


class VideoCsv(torch.utils.data.Dataset):
    """Clips listed in a CSV (or TSV, by suffix) with columns ``filepath`` and ``title``:
    ``ds[i]`` is ``(clip (t, 3, H, W), caption)``, or ``None`` when the file cannot be read
    (counted in ``skipped``, its name in ``skips.names`` and the log). Relative paths are resolved
    against the CSV's folder (or ``video_root``). Rows with a blank caption are dropped up front
    (``num_empty``); missing files give ``None`` like unreadable ones.
    """

    def __init__(self, path: str | Path, *, frames: int, image_size: int, sampling: str = "uniform",
                 stride: int | None = None, video_key: str = "filepath", caption_key: str = "title",
                 video_root: str | Path | None = None, preprocess: ImagePreprocess | None = None) -> None:
        _check_args(frames, image_size, sampling, stride)
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"path: no such CSV file {str(p)!r}")
        sep = "\t" if p.suffix.lower() == ".tsv" else ","
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"path: {p} is not UTF-8 text ({err})") from None
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
        columns = reader.fieldnames or []
        for key, arg in ((video_key, "video_key"), (caption_key, "caption_key")):
            if key not in columns:
                raise ValueError(f"{arg}={key!r} is not a column of {p}; columns are {columns}")
        root = Path(video_root).expanduser() if video_root is not None else p.parent
        self.path = p
        self.frames, self.image_size, self.sampling, self.stride = frames, image_size, sampling, stride
        self.preprocess = preprocess
        self.samples: list[tuple[Path, str]] = []
        self.rows: list[int] = []
        self.empty_rows: list[int] = []
        try:
            for row in reader:
                rel, caption = (row.get(video_key) or "").strip(), (row.get(caption_key) or "").strip()
                if not caption or not rel:
                    self.empty_rows.append(reader.line_num)
                    continue
                self.samples.append((Path(rel) if Path(rel).is_absolute() else root / rel, caption))
                self.rows.append(reader.line_num)
        except csv.Error as err:
            raise ValueError(f"path: {p} row {reader.line_num} is not valid CSV ({err})") from None
        if self.empty_rows:
            log.warning("%s: %d rows with a blank file path or caption were dropped (first: row %d)",
                        p, len(self.empty_rows), self.empty_rows[0])
        self.skips = SkippedVideos(str(p))
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        """Videos found unreadable or missing so far (in this process)."""
        return self.skips.count

    @property
    def num_empty(self) -> int:
        return len(self.empty_rows)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None:
        fp, caption = self.samples[index]
        try:
            clip = read_clip(fp, frames=self.frames, image_size=self.image_size, sampling=self.sampling,
                             stride=self.stride, preprocess=self.preprocess,
                             where=f"{self.path} row {self.rows[index]} ({fp})")
        except (VideoDecodeError, FileNotFoundError) as err:
            if index not in self._bad:
                self._bad.add(index)
                self.skips.add(str(fp), err)
            return None
        return clip, caption


def _shard_members(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar shard, members grouped by key (the path up to the
    first dot of the file name, WebDataset's rule), consecutive members of one key together."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(url, mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            k = f"{folder}/{stem}" if folder else stem
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            f = tar.extractfile(member)
            parts[ext.lower()] = f.read() if f is not None else b""
    if key is not None:
        yield key, parts


def _caption(parts: dict[str, bytes], where: str) -> str:
    if "txt" in parts:
        text = parts["txt"].decode("utf-8")
    elif "json" in parts:
        meta = json.loads(parts["json"].decode("utf-8"))
        keys = ("caption", "title", "text")
        text = next((meta[k] for k in keys if isinstance(meta, dict) and isinstance(meta.get(k), str)), "")
        if not text:
            raise KeyError(f"{where}: the json has no caption/title/text string")
    else:
        raise KeyError(f"{where}: no .txt or .json caption; parts {sorted(parts)}")
    if not text.strip():
        raise ValueError(f"{where}: blank caption")
    return text.strip()


def video_shard_samples(
    urls: str | Path | Iterable[str | Path],
    *,
    frames: int,
    image_size: int,
    sampling: str = "uniform",
    stride: int | None = None,
    preprocess: ImagePreprocess | None = None,
    skips: SkippedVideos | None = None,
) -> Iterator[tuple[torch.Tensor, str, str]]:
    """``(clip (t, 3, H, W), caption, key)`` for every sample of local WebDataset tar shards with a
    video member (``VIDEO_EXTENSIONS``) and a ``.txt`` or ``.json`` caption, in shard order.

    ``urls``: a shard path, a pattern (``clips-{000..009}.tar``, globs, ``::``; see
    :func:`mammut.data.webdataset.expand_shards`) or a list. A sample whose video cannot be decoded,
    or without a video or caption, and an unreadable shard, are skipped and counted in ``skips``
    (pass a :class:`SkippedVideos` to read the count and names).
    """
    _check_args(frames, image_size, sampling, stride)
    from .webdataset import expand_shards

    shards = expand_shards(urls if isinstance(urls, (str, Path)) else [str(u) for u in urls], key="urls")
    skips = skips if skips is not None else SkippedVideos("video shards")
    for url in shards:
        try:
            for key, parts in _shard_members(url):
                where = f"shard {url} key {key}"
                ext = next((e for e in VIDEO_EXTENSIONS if e in parts), None)
                try:
                    if ext is None:
                        raise KeyError(f"{where}: no video member ({'/'.join(VIDEO_EXTENSIONS)}); parts {sorted(parts)}")
                    caption = _caption(parts, where)
                    clip = read_clip(parts[ext], frames=frames, image_size=image_size, sampling=sampling,
                                     stride=stride, preprocess=preprocess, where=f"{where} ({ext})")
                except (VideoDecodeError, KeyError, ValueError) as err:
                    skips.add(where, err)
                    continue
                yield clip, caption, key
        except (tarfile.TarError, OSError) as err:
            skips.add(f"shard {url}", err)


def write_video(path: str | Path, frames: Any, *, fps: float = 10, codec: str = "mpeg4",
                times: Sequence[float] | None = None, bit_rate: int | None = None, gop: int | None = 12) -> Path:
    """Write ``frames`` (uint8 ``(t, H, W, 3)`` array/tensor, or float ``(t, 3, H, W)`` in [0, 1]) as a
    video file (container from the suffix: .mp4, .webm, ...). ``times``: each frame's time in seconds
    (a variable frame rate), else ``1 / fps`` apart. ``codec``: an FFmpeg encoder in PyAV's wheel
    (``mpeg4``, ``libx264``, ``libvpx-vp9``, ...); ``gop``: frames between keyframes (``None``: the
    encoder's default). H and W are made even (yuv420p needs it)."""
    import numpy as np

    av = import_av()
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4:
        raise ValueError(f"frames: expected (t, H, W, 3) uint8 or (t, 3, H, W) float, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.shape[1] != 3:
            raise ValueError(f"frames: a float array must be (t, 3, H, W), got shape {arr.shape}")
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise ValueError(f"frames: expected (t, H, W, 3) uint8, got shape {arr.shape}")
    if times is not None and (len(times) != len(arr) or any(b <= a for a, b in zip(times, times[1:]))):
        raise ValueError(f"times: expected {len(arr)} increasing times, got {list(times)[:8]}...")
    h, w = arr.shape[1] - arr.shape[1] % 2, arr.shape[2] - arr.shape[2] % 2
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1000)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        if gop is not None:
            stream.codec_context.gop_size = gop
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, a in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a[:h, :w]), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out

"""Video benchmarks (``mammut eval video-retrieval | video-caption | videoqa``): the protocols on a
stub model whose answers are known (each video matched to its own captions, skipped files
counted and named, accuracy per question type, out-of-vocabulary answers wrong), the data
formats, and end to end through the CLI on a tiny video MaMMUT checkpoint and real mp4 / webm
files (plus the moving-emoji default)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="the video extra (PyAV) is not installed")

import mammut  # noqa: E402
from mammut.cli import main  # noqa: E402
from mammut.data.video_files import write_video  # noqa: E402
from mammut.eval.video import VideoInput, video_input  # noqa: E402
from mammut.eval.video_data import find_video, read_captioned_videos, read_video_questions  # noqa: E402
from mammut.eval.video_eval import evaluate_video_captioning, evaluate_video_retrieval, evaluate_videoqa  # noqa: E402

N_VIDEOS = 5
QUIET = ["--workers", "0", "--no-progress"]
TUBES = (((4, 8, 8), (4, 16, 16), (0, 0, 0)), ((8, 4, 4), (8, 16, 16), (0, 4, 4)))


def grey_clip(level: int, frames: int = 12, size: int = 32) -> np.ndarray:
    return np.full((frames, size, size, 3), level, np.uint8)


def level_of(clip: torch.Tensor) -> int:
    """The video index a grey clip codes (level 40 * (k + 1))."""
    return round(float(clip.mean()) * 255 / 40) - 1


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """video{k}.mp4 / .webm, grey level 40 (k + 1); video3 is corrupt, video9 missing; MSR-VTT CSV,
    MSRVTT_data.json, LAVIS JSON and MSRVTT-QA JSON naming them."""
    root = tmp_path_factory.mktemp("msrvtt")
    vids = root / "videos"
    for k in range(N_VIDEOS):
        if k == 3:
            (vids / "video3.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
        elif k == 4:
            write_video(vids / "video4.webm", grey_clip(40 * (k + 1)), fps=8, codec="libvpx-vp9")
        else:
            write_video(vids / f"video{k}.mp4", grey_clip(40 * (k + 1)), fps=8)
    ids = [f"video{k}" for k in range(N_VIDEOS)] + ["video9"]
    with (root / "MSRVTT_JSFUSION_test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for i, v in enumerate(ids):
            w.writerow([f"ret{i}", f"msr{i}", v, f"clip number {v[5:]}"])
    (root / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": v, "split": "test" if v != "video0" else "train"} for v in ids],
        "sentences": [{"video_id": v, "caption": c} for v in ids for c in (f"clip number {v[5:]}", f"grey {v[5:]}")]}))
    (root / "cap_test.json").write_text(json.dumps([{"video": f"{v}.mp4", "caption": f"clip number {v[5:]}"}
                                                    for v in ids[:3]]))
    qa = []
    for k in range(N_VIDEOS):
        qa.append({"question": "what number is the clip?", "answer": str(k), "video_id": k, "id": 2 * k})
        qa.append({"question": "who is grey?", "answer": "the clip" if k else "nobody", "video_id": k, "id": 2 * k + 1})
    (root / "test_qa.json").write_text(json.dumps(qa))
    return root


class Stub:
    """An EvalModel stand-in that embeds a grey clip / 'clip number k' text as one-hot k and answers
    'k' to 'what' questions, 'the clip' to others; ``video`` says whether it takes clips."""

    def __init__(self, video: bool = True) -> None:
        self.video = video
        self.preprocess = mammut.ImagePreprocess(16)
        self.model = torch.nn.Identity()
        self.vqa_encoder = None
        self.source = "stub"
        self.name = "Stub"
        self.seen: list[tuple[int, ...]] = []

    def require(self, what: str, task: str) -> None:
        pass

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(images.shape))
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(level_of(x)), 10).float() for x in images])

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(int(t.split()[-1]) % 10), 10).float()
                            for t in texts])

    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        return [[1, len(t)] for t in texts]

    def generate(self, images: torch.Tensor, prompts: Any = None, **options: Any) -> list[str]:
        self.seen.append(tuple(images.shape))
        if prompts is None:
            return [f"clip number {level_of(x)}" for x in images]
        return [str(level_of(x)) if p[1] == len("what number is the clip? answer:") else "the clip"
                for x, p in zip(images, prompts)]


@pytest.fixture(autouse=True)
def _stub_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_input(em: Any, frames: int | None = None) -> VideoInput:
        if isinstance(em, Stub):
            return VideoInput(frames or 4, 16, em.video, em.preprocess)
        return video_input(em, frames)

    monkeypatch.setattr("mammut.eval.video_eval.video_input", fake_input)


def test_retrieval_matches_each_video_to_its_captions_and_counts_skipped_files(data: Path, tmp_path: Path) -> None:
    em = Stub()
    metrics, sections, figures = evaluate_video_retrieval(em, tmp_path, data=data / "MSRVTT_JSFUSION_test.csv",
                                                          videos=data / "videos", progress=False, batch_size=2)
    assert metrics["n_videos"] == 4 and metrics["n_texts"] == 4
    assert metrics["v2t_R@1"] == 1.0 and metrics["t2v_R@1"] == 1.0
    sk = metrics["videos_skipped"]
    assert (sk["missing"], sk["corrupt"]) == (1, 1)
    assert any("video3.mp4" in e for e in sk["examples"]) and any("video9" in e for e in sk["examples"])
    assert metrics["comparable_to_published"] is False and "2 videos skipped" in metrics["not_comparable_because"][0]
    assert all(s[1:] == (4, 3, 16, 16) for s in em.seen)  # clips (b, t, 3, H, W) to a video model
    assert (tmp_path / "clips.png").is_file() and "Video-text retrieval" in sections[1]


def test_an_image_model_sees_independent_frames_mean_pooled(data: Path, tmp_path: Path) -> None:
    em = Stub(video=False)
    metrics, _, _ = evaluate_video_retrieval(em, tmp_path, data=data / "MSRVTT_data.json", videos=data / "videos",
                                             split="test", frames=3, progress=False, batch_size=4)
    assert em.seen[0] == (9, 3, 16, 16)  # 3 clips x 3 frames
    assert metrics["n_videos"] == 3 and metrics["captions_per_video"] == 2 and metrics["v2t_R@1"] == 1.0
    assert "image-only model" in metrics["input"]


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """METEOR's Java start costs ~10 s here; the image captioning tests cover it."""
    monkeypatch.setattr("mammut.eval.caption_metrics.java_available", lambda: False)


def test_captioning_scores_with_pycocoevalcap_and_writes_coco_results(data: Path, tmp_path: Path, no_java: None) -> None:
    em = Stub()
    metrics, sections, _ = evaluate_video_captioning(em, tmp_path, data=data / "cap_test.json", videos=data / "videos",
                                                     progress=False, tokenizer="simple")
    assert metrics["n_videos"] == 3 and metrics["exact_match"] == 1.0
    assert metrics["cider_d"] > 1.0 and metrics["bleu1"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["absent"] == {"meteor": "java not found"} or "meteor" in metrics["absent"]
    results = json.loads((tmp_path / "captions.json").read_text())
    assert results[1] == {"image_id": "video1.mp4", "caption": "clip number 1"}
    assert (tmp_path / "captions.png").is_file()


def test_videoqa_accuracy_per_question_type_and_out_of_vocabulary(data: Path, tmp_path: Path) -> None:
    em = Stub()
    vocab = tmp_path / "train_ans2label.json"
    vocab.write_text(json.dumps({"0": 0, "1": 1, "2": 2, "the clip": 3}))
    metrics, sections, _ = evaluate_videoqa(em, tmp_path / "out", data=data / "test_qa.json", videos=data / "videos",
                                            answers=vocab, progress=False)
    # video 3 is corrupt: 8 questions; 'what': 0, 1, 2 right, 4 out of vocabulary; 'who': 'nobody' for video 0 wrong
    assert metrics["n_questions"] == 8 and metrics["questions_skipped"] == 2
    assert metrics["per_question_type"]["what"] == {"accuracy": 0.75, "n": 4}
    assert metrics["per_question_type"]["who"] == {"accuracy": 0.75, "n": 4}
    assert metrics["oov_answers"] == 2 and metrics["accuracy"] == 0.75  # 'nobody' (video 0) and '4'
    answers = json.loads((tmp_path / "out" / "answers.json").read_text())
    assert {"question_id": 2, "video_id": "1", "answer": "1"} in answers


def test_formats_and_video_lookup(data: Path) -> None:
    ds = read_captioned_videos(data / "MSRVTT_data.json", data / "videos", split="test")
    assert ds.ids[0] == "video1" and ds.captions[0] == ["clip number 1", "grey 1"]
    assert ds.paths[3] == data / "videos" / "video4.webm"
    qa = read_video_questions(data / "test_qa.json", data / "videos")
    assert qa.paths["2"] == data / "videos" / "video2.mp4"  # a numeric id: MSR-VTT's video{id}
    assert find_video(data / "videos", "7", "clip_{video_id}.avi") == data / "videos" / "clip_7.avi"
    with pytest.raises(ValueError, match="--split: expected one of"):
        read_captioned_videos(data / "MSRVTT_data.json", split="val")
    with pytest.raises(ValueError, match="video_id,sentence"):
        bad = data / "bad.csv"
        bad.write_text("a,b\n1,2\n")
        read_captioned_videos(bad)


# --------------------------------------------------------------------- end to end, tiny checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mammut.models.mammut import MaMMUTConfig
    from mammut.tokenizer import train_bpe

    tok = train_bpe(["clip number 1 grey what who the clip nobody answer"] * 4, vocab_size=300)
    tok.context_length = 16
    torch.manual_seed(0)
    cfg = MaMMUTConfig(dim=32, num_tokens=tok.vocab_size, depth=1, heads=2, dim_head=16, bos_id=tok.bos_id,
                       eos_id=tok.eos_id, encoder={"type": "video_tube", "frames": 8, "frame_stride": 4, "tubes": TUBES,
                                                   "vit": dict(image_size=32, patch_size=8, dim=48, depth=1, heads=2,
                                                               dim_head=16)})
    folder = tmp_path_factory.mktemp("video-ck") / "ck"
    mammut.MaMMUT(cfg).save_pretrained(folder, preprocess=mammut.ImagePreprocess(32), tokenizer=tok)
    return folder


def _metrics(out: Path) -> tuple[dict[str, Any], str]:
    return json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text()


def test_cli_video_benchmarks_on_real_files(checkpoint: Path, data: Path, tmp_path: Path, no_java: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    common = [str(checkpoint), "--videos", str(data / "videos"), *QUIET]
    assert main(["eval", "video-retrieval", *common, "--data", str(data / "MSRVTT_JSFUSION_test.csv"),
                 "--out", str(tmp_path / "r")]) == 0
    m, report = _metrics(tmp_path / "r")
    assert m["n_videos"] == 4 and m["frames"] == 8 and m["video_encoder"] is True
    assert 0 <= m["v2t_R@1"] <= 1 and m["v2t_R@10"] == 1.0
    assert "![Videos with their nearest caption" in report and "1 unreadable" in report
    assert "4 videos; 2 videos skipped" in capsys.readouterr().out
    assert main(["eval", "video-caption", *common, "--data", str(data / "MSRVTT_data.json"), "--split", "test",
                 "--max-new-tokens", "3", "--tokenizer", "simple", "--out", str(tmp_path / "c")]) == 0
    m, report = _metrics(tmp_path / "c")
    assert m["n_videos"] == 3 and m["references_per_video"] == 2 and "cider_d" in m and "captions.png" in report
    assert main(["eval", "videoqa", *common, "--data", str(data / "test_qa.json"), "--sampling", "stride",
                 "--stride", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "q")]) == 0
    m, report = _metrics(tmp_path / "q")
    assert m["n_questions"] == 8 and set(m["per_question_type"]) == {"what", "who"}
    assert m["sampling"] == "stride (stride 1)" and "examples.png" in report


def test_cli_defaults_to_held_out_moving_emoji(checkpoint: Path, tmp_path: Path, no_java: None) -> None:
    for bench, extra in (("video-retrieval", []), ("video-caption", ["--max-new-tokens", "3"]),
                         ("videoqa", ["--max-new-tokens", "2"])):
        assert main(["eval", bench, str(checkpoint), "--emoji-clips", "6", "--out", str(tmp_path / bench), *QUIET,
                     *extra]) == 0
        m, report = _metrics(tmp_path / bench)
        assert m["data"] == "moving-emoji held-out clips (6)"
        assert m.get("n_videos", m.get("n_questions")) == 6
    assert m["per_question_type"]  # videoqa: the moving-emoji question types


def test_bad_options_are_one_line_errors(checkpoint: Path, data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["video-retrieval", str(checkpoint), "--sampling", "stride"], "--stride: expected a number of frames"),
        (["video-retrieval", str(checkpoint), "--data", str(tmp_path / "nope.csv")], "--data: no such file"),
        (["video-retrieval", str(checkpoint), "--data", str(data / "MSRVTT_JSFUSION_test.csv"), "--frames", "4"],
         "--frames: this model's video encoder takes 8 frames per clip, got 4"),
        (["videoqa", str(checkpoint), "--answers", str(tmp_path / "none.json")], "--answers: no such file"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv, "--out", str(tmp_path / "o"), *QUIET]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mammut eval: error:") and message in err[0], err


def test_a_videoqa_run_is_prompted_as_it_was_trained(tmp_path: Path) -> None:
    run = tmp_path / "videoqa-run"
    assert main(["train", "--config", "videoqa-tiny", "--train.out_dir", str(run), "--train.steps", "1",
                 "--train.threads", "1", "--train.progress", "false", "--train.report", "false"]) == 0
    assert main(["eval", "videoqa", str(run), "--emoji-clips", "4", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "q"), *QUIET]) == 0
    m, _ = _metrics(tmp_path / "q")
    assert m["prompt"] == "the run's VQA prompt (BOS question answer:)" and m["n_questions"] == 4

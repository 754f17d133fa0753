"""The four evaluation tasks on tiny datasets drawn with PIL, scored with a fake model whose
embeddings and outputs are known, so every figure can be checked against a value worked out
by hand (several captions / answers per image included), and skipped images are counted."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from mammut.eval.model_source import EvalModel
from mammut.eval.retrieval import image_to_text_chance
from mammut.eval.vqa import question_accuracy

COLOURS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}
DIM = len(COLOURS)


def draw(path, colour, size=(24, 20)):
    """A square of ``colour`` on a grey background."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(img).rectangle((4, 4, 16, 16), fill=RGB[colour])
    img.save(path)
    return path


def preprocess(img: Image.Image) -> torch.Tensor:
    """The centre pixel's colour (3,) in [0, 1]."""
    img = img.convert("RGB")
    return torch.tensor(img.getpixel((10, 10)), dtype=torch.float32) / 255


def colour_of(pixel: torch.Tensor) -> int:
    rgb = (pixel * 255).round().tolist()
    return min(range(DIM), key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, RGB[COLOURS[k]])))


class WordTokenizer:
    """Whitespace words -> ids (0 pad, 1 bos, 2 eos), learnt as they come."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.words: list[str] = ["[PAD]", "[BOS]", "[EOS]"]

    def id(self, w: str) -> int:
        if w not in self.words:
            self.words.append(w)
        return self.words.index(w)

    def __call__(self, texts, context_length=None):
        rows = [[1, *[self.id(w) for w in t.split()], 2] for t in texts]
        n = context_length or max(len(r) for r in rows)
        out = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            r = r[:n - 1] + [2] if len(r) > n else r
            out[i, :len(r)] = torch.tensor(r)
        return out

    def decode(self, ids):
        out = []
        for row in ids.tolist():
            row = row[1:] if row and row[0] == 1 else row
            row = row[:row.index(2)] if 2 in row else row
            out.append(" ".join(self.words[i] for i in row if i > 2))
        return out


class FakeModel(nn.Module):
    """Image -> one-hot of its colour; text -> one-hot of the first colour word in it (a text
    naming no colour: all zeros). ``captions[k]`` is generated for an image of colour ``k``;
    with a prompt, the answer is ``answers[k]``."""

    def __init__(self, tok: WordTokenizer, captions=None, answers=None) -> None:
        super().__init__()
        self.tok, self.captions, self.answers = tok, captions or {}, answers or {}
        self.w = nn.Parameter(torch.zeros(1))
        self.prompts: list = []

    def embed_image(self, images):
        return F.one_hot(torch.tensor([colour_of(p) for p in images]), DIM).float() + 0 * self.w

    def embed_text(self, ids):
        out = torch.zeros(len(ids), DIM)
        for i, text in enumerate(self.tok.decode(ids)):
            words = [w.strip(".,") for w in text.split()]
            k = next((COLOURS.index(w) for w in words if w in COLOURS), None)
            if k is not None:
                out[i, k] = 1.0
        return out

    def generate(self, images, prompt=None, **options):
        self.prompts.append((prompt, options))
        table = self.answers if prompt is not None else self.captions
        texts = [table[COLOURS[colour_of(p)]] for p in images]
        return self.tok(texts)[:, 1:]  # new tokens only (no bos)


def fake(captions=None, answers=None, bf16=False) -> EvalModel:
    tok = WordTokenizer()
    return EvalModel(FakeModel(tok, captions, answers), preprocess, tok, "fake", torch.device("cpu"), bf16)


# ----------------------------------------------------------------------------- zero-shot


def test_zeroshot_known_accuracy_confusion_and_skips(tmp_path):
    from mammut.eval.zeroshot import evaluate_zeroshot

    data = tmp_path / "folder"
    # red: 3 red images; green: 2 green + 1 blue (misfiled); blue: 1 blue; yellow: 2 yellow
    for i in range(3):
        draw(data / "red" / f"{i}.png", "red")
    draw(data / "green" / "0.png", "green")
    draw(data / "green" / "1.png", "green")
    draw(data / "green" / "2.png", "blue")
    draw(data / "blue" / "0.png", "blue")
    draw(data / "yellow" / "0.png", "yellow")
    draw(data / "yellow" / "1.png", "yellow")
    (data / "yellow" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na {} thing\n")
    metrics, sections, figures = evaluate_zeroshot(fake(), data, tmp_path / "out", templates=str(templates),
                                                   progress=False, batch_size=3)
    # classes sorted: blue, green, red, yellow; the misfiled blue image is the one error
    assert metrics["n_images"] == 9 and metrics["n_classes"] == 4 and metrics["n_templates"] == 2
    assert metrics["top1"] == pytest.approx(8 / 9)
    assert metrics["top5"] == pytest.approx(1.0) and "top-4" in metrics["top5_note"]
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 2 / 3 + 1 + 1) / 4)
    assert (metrics["limit"], metrics["n_total"], metrics["comparable_to_published"]) == (None, 10, False)  # 1 corrupt
    assert metrics["per_class"]["green"] == {"recall": pytest.approx(2 / 3), "images": 3}
    assert metrics["skipped"]["corrupt"] == 1 and metrics["skipped"]["missing"] == 0
    confusion = (tmp_path / "out" / "confusion.csv").read_text().split()
    assert confusion == ["1,0,0,0", "1,2,0,0", "0,0,3,0", "0,0,0,2"]
    assert "| green | blue | 1 | 0.333 |" in "\n".join(sections)
    assert [name for name, png in figures if png is not None and png.stat().st_size > 0] == \
        ["Confusion matrix", "Per-class recall", "Images with the predicted (P) and true (T) class"]


def test_zeroshot_classnames_and_templates_options(tmp_path):
    from mammut.eval.zeroshot import evaluate_zeroshot, load_templates, shipped_list

    data = tmp_path / "folder"
    draw(data / "c0" / "0.png", "red")
    draw(data / "c1" / "0.png", "green")
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\n")
    metrics, _, _ = evaluate_zeroshot(fake(), data, tmp_path / "out", classnames=str(names), templates="a {}",
                                      progress=False)
    assert metrics["top1"] == 1.0  # folder names say nothing; the file's names do
    names.write_text("red\n")
    with pytest.raises(ValueError, match=r"--classnames: expected one name per class folder of --data \(2\), got 1"):
        evaluate_zeroshot(fake(), data, tmp_path / "out", classnames=str(names), progress=False)
    with pytest.raises(ValueError, match=r"--classnames: expected one name per class folder of --data \(2\), got 1000"):
        evaluate_zeroshot(fake(), data, tmp_path / "out", classnames="imagenet", progress=False)
    assert len(shipped_list("classnames")) == 1000 and shipped_list("classnames")[:2] == ["tench", "goldfish"]
    assert len(load_templates(None)) == 80 and load_templates("imagenet")[0] == "a bad photo of a {}."
    with pytest.raises(FileNotFoundError, match="--templates: expected a file of templates"):
        load_templates("no-such-file.txt")
    bad = tmp_path / "t.txt"
    bad.write_text("a {}\nno placeholder\n")
    with pytest.raises(ValueError, match="--templates: expected each template to hold one {} .* template 2"):
        load_templates(str(bad))


def test_zeroshot_classnames_folder_tab_name_mapping(tmp_path):
    """A ``folder<TAB>name`` file maps folders to names in any line order; a plain file keeps
    its folder order; a missing, unknown or repeated folder and a mixed file name the culprits."""
    from mammut.eval.zeroshot import evaluate_zeroshot, load_classnames

    folders = ["n01", "n02", "n03", "n04"]
    plain = tmp_path / "plain.txt"
    plain.write_text("tench\ngoldfish\ngreat white shark\ntiger shark\n")
    mapping = tmp_path / "map.tsv"
    mapping.write_text("# folder<TAB>name\nn03\tgreat white shark\n\nn01\ttench\nn04\ttiger shark\nn02\tgoldfish\n")
    assert load_classnames(str(mapping), folders) == load_classnames(str(plain), folders) == \
        ["tench", "goldfish", "great white shark", "tiger shark"]

    def error(text: str) -> str:
        mapping.write_text(text)
        with pytest.raises(ValueError) as exc:
            load_classnames(str(mapping), folders)
        return str(exc.value)

    msg = error("n01\ttench\nn02\tgoldfish\nn04\ttiger shark\n")
    assert msg.startswith("--classnames: expected each of the 4 class folders of --data once") and \
        "got 1 missing (named on no line): folder 'n03' in " in msg and "repeated" not in msg and "unknown" not in msg
    msg = error("n01\ttench\nn02\tgoldfish\nn03\tshark\nn04\ttiger shark\nn99\tcarp\n")
    assert "got 1 unknown (not a class folder of --data): folder 'n99' (line 5) in" in msg and "missing" not in msg
    msg = error("n01\ttench\nn02\tgoldfish\nn03\tshark\nn04\ttiger shark\nn02\tcarp\n")
    assert "got 1 repeated: folder 'n02' (lines 2, 5) in" in msg and "missing" not in msg
    msg = error("n01\ttench\nn02\tgoldfish\nn0e\tshark\nn04\ttiger shark\n")  # a typo: both sides named
    assert "unknown (not a class folder of --data): folder 'n0e' (line 3); 1 missing" in msg
    assert msg.endswith("folder 'n03' in " + str(mapping))
    msg = error("".join(f"x{i}\tname\n" for i in range(8)))
    assert "8 unknown (not a class folder of --data): folders 'x0' (line 1), " in msg
    assert "'x4' (line 5) and 3 more;" in msg
    assert "4 missing (named on no line): folders 'n01', 'n02', 'n03', 'n04' in" in msg
    msg = error("n01\ttench\ngoldfish\nn03\tshark\n\ntiger shark\n")
    assert "expected every line to be folder<TAB>name or none" in msg and "2 without" in msg and \
        msg.endswith("without a tab: lines 2, 5")
    msg = error("n01\ttench\tTinca tinca\nn02\tgoldfish\nn03\tshark\nn04\ttiger shark\n")
    assert "expected folder<TAB>name lines with one tab" in msg and msg.endswith(": line 1")

    data = tmp_path / "folder"
    draw(data / "c0" / "0.png", "red")
    draw(data / "c1" / "0.png", "green")
    mapping.write_text("c1\tgreen\nc0\tred\n")  # not in folder order: the mapping decides
    metrics, _, _ = evaluate_zeroshot(fake(), data, tmp_path / "out", classnames=str(mapping), templates="a {}",
                                      progress=False)
    assert metrics["top1"] == 1.0 and list(metrics["per_class"]) == ["red", "green"]
    mapping.write_text("c1\tgreen\nc2\tred\n")
    with pytest.raises(ValueError, match=r"--classnames: .*'c2' \(line 2\).* missing .*: folder 'c0'"):
        evaluate_zeroshot(fake(), data, tmp_path / "out", classnames=str(mapping), progress=False)


def test_zeroshot_needs_a_contrastive_model(tmp_path):
    from mammut.eval.zeroshot import evaluate_zeroshot

    class CaptionOnly(nn.Module):
        def generate(self, images, **kw):
            raise AssertionError("not called")

    em = EvalModel(CaptionOnly(), preprocess, WordTokenizer(), "captioner")
    with pytest.raises(ValueError, match="SOURCE: mammut eval zeroshot needs a contrastive model .* got CaptionOnly"):
        evaluate_zeroshot(em, tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------- retrieval


def _karpathy(tmp_path, entries):
    images = []
    for i, (colour, caps, split) in enumerate(entries):
        if colour is not None:
            draw(tmp_path / "imgs" / f"{i}.png", colour)
        images.append({"filename": f"{i}.png", "split": split, "sentences": [{"raw": c} for c in caps]})
    path = tmp_path / "karpathy.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_retrieval_known_recall_several_captions_per_image(tmp_path):
    from mammut.eval.retrieval import evaluate_retrieval

    path = _karpathy(tmp_path, [
        ("red", ["a red square", "red on grey"], "test"),
        ("green", ["a green square", "green on grey"], "test"),
        ("blue", ["a blue square", "blue on grey"], "test"),
        ("yellow", ["a yellow square", "it is red"], "test"),  # its second caption names the wrong colour
        (None, ["a missing image"], "test"),
        ("red", ["a red one"], "train"),
    ])
    metrics, sections, figures = evaluate_retrieval(fake(), path, tmp_path / "out", images=tmp_path / "imgs",
                                                    progress=False, batch_size=2)
    assert metrics["n_images"] == 4 and metrics["n_texts"] == 8 and metrics["skipped"]["missing"] == 1
    # image -> text: the red image ties "it is red" (yellow's) with its own captions: pessimistic rank 1
    assert metrics["i2t_R@1"] == pytest.approx(3 / 4) and metrics["i2t_R@5"] == 1.0
    # text -> image: "it is red" ranks its image (similarity 0) behind red and tied with two more: rank 3
    assert metrics["t2i_R@1"] == pytest.approx(7 / 8) and metrics["t2i_R@5"] == 1.0
    assert metrics["chance"]["t2i_R@1"] == pytest.approx(1 / 4)
    assert metrics["chance"]["i2t_R@1"] == pytest.approx(2 / 8)  # 2 captions of 8
    assert metrics["curve"]["i2t"][:2] == [pytest.approx(0.75), 1.0] and len(metrics["curve"]["t2i"]) == 8
    assert "| image -> text | 0.750 | 1.000 | 1.000 |" in sections[0]
    assert figures[0][1].stat().st_size > 0


def test_retrieval_csv_matches_the_json(tmp_path):
    from mammut.eval.retrieval import evaluate_retrieval

    for i, c in enumerate(["red", "green", "blue"]):
        draw(tmp_path / f"{c}.png", c)
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title\nred.png,a red thing\ngreen.png,green\nred.png,red again\nblue.png,green too\n"
                   "gone.png,whatever\n")
    metrics, _, _ = evaluate_retrieval(fake(), csv, tmp_path / "out", progress=False, workers=1)
    assert metrics["layout"] == "csv" and metrics["n_images"] == 3 and metrics["n_texts"] == 4
    assert metrics["skipped"] == {"missing": 1, "corrupt": 0, "total": 1, "examples": [str(tmp_path / "gone.png")]}
    # "green too" (blue's) ties with green's caption: green image rank 1, blue image's only caption misses
    assert metrics["i2t_R@1"] == pytest.approx(1 / 3) and metrics["t2i_R@1"] == pytest.approx(3 / 4)
    assert metrics["texts_shared_by_images"] == 0
    # an image skipped: the full set (4 images) was asked for, but the numbers are not the published protocol's
    assert (metrics["limit"], metrics["n_total"], metrics["comparable_to_published"]) == (None, 4, False)
    assert metrics["data_left_out"] == {"images_without_captions": 0, "captions_unknown_image": 0, "empty_captions": 0}
    csv.write_text("filepath,title\nred.png,a red thing\ngreen.png,green\nblue.png,\n")
    metrics, _, _ = evaluate_retrieval(fake(), csv, tmp_path / "out", progress=False)
    assert (metrics["limit"], metrics["n_total"], metrics["comparable_to_published"]) == (None, 2, True)
    assert metrics["data_left_out"]["empty_captions"] == 1 and metrics["data_left_out"]["images_without_captions"] == 1


def test_image_to_text_chance_by_hand():
    # 2 images with 1 and 3 captions among 4: R@1 = (1/4 + 3/4) / 2; R@2: 1 - C(3,2)/C(4,2) = 1/2 and 1
    assert image_to_text_chance([1, 3], 1) == pytest.approx(0.5)
    assert image_to_text_chance([1, 3], 2) == pytest.approx((0.5 + 1.0) / 2)


# ----------------------------------------------------------------------------- captioning


def test_captioning_bleu_by_hand_with_several_references(tmp_path):
    from mammut.eval.captioning import evaluate_captioning

    draw(tmp_path / "1.png", "red")
    draw(tmp_path / "2.png", "green")
    (tmp_path / "3.png").write_bytes(b"broken")
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2, 3)],
            "annotations": [{"image_id": 1, "caption": "The cat sat on a mat."},
                            {"image_id": 2, "caption": "a dog"}, {"image_id": 2, "caption": "one small dog"},
                            {"image_id": 3, "caption": "never read"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    em = fake(captions={"red": "the cat sat on the mat", "green": "a dog"})
    metrics, sections, figures = evaluate_captioning(em, path, tmp_path / "out", generation={"max_new_tokens": 5},
                                                     progress=False)
    # corpus BLEU: clipped matches / candidate n-grams summed over both images; lengths 6 + 2, closest refs 6 + 2
    p = [(5 + 2) / (6 + 2), (3 + 1) / (5 + 1), 2 / 4, 1 / 3]
    assert metrics["bleu1"] == pytest.approx(p[0], rel=1e-6)
    assert metrics["bleu4"] == pytest.approx(math.prod(p) ** 0.25, rel=1e-6)
    assert metrics["n_images"] == 2 and metrics["skipped"]["corrupt"] == 1
    assert (metrics["limit"], metrics["n_total"], metrics["comparable_to_published"]) == (None, 3, False)
    assert metrics["references_per_image"] == 1.5 and metrics["generation"] == {"max_new_tokens": 5}
    assert em.model.prompts[0] == (None, {"max_new_tokens": 5})
    assert 0 < metrics["rouge_l"] <= 1 and metrics["cider_d"] > 0
    saved = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert [(r["image_id"], r["caption"]) for r in saved] == [(1, "the cat sat on the mat"), (2, "a dog")]
    assert "| BLEU-4 |" in sections[0] and figures[0][1].stat().st_size > 0


def test_captioning_rejects_bad_generation_options_before_reading(tmp_path):
    from mammut.eval.captioning import evaluate_captioning

    with pytest.raises(ValueError, match="num_beams: expected an integer >= 1, got 0"):
        evaluate_captioning(fake(), tmp_path / "never-read.json", tmp_path / "out", generation={"num_beams": 0})


# ----------------------------------------------------------------------------- VQA


def test_vqa_official_accuracy_by_hand(tmp_path):
    from mammut.eval.vqa import evaluate_vqa

    draw(tmp_path / "imgs" / "1.jpg", "red")
    draw(tmp_path / "imgs" / "2.jpg", "green")
    questions = {"questions": [{"question_id": 10, "image_id": 1, "question": "what colour?"},
                               {"question_id": 11, "image_id": 1, "question": "is it red?"},
                               {"question_id": 20, "image_id": 2, "question": "what colour?"},
                               {"question_id": 30, "image_id": 3, "question": "no image"}]}
    ten = lambda *pairs: [{"answer": a} for a, n in pairs for _ in range(n)]  # noqa: E731
    annotations = {"annotations": [
        {"question_id": 10, "answers": ten(("red", 2), ("maroon", 8)), "answer_type": "other"},
        {"question_id": 11, "answers": ten(("red", 2), ("maroon", 8)), "answer_type": "yes/no"},
        {"question_id": 20, "answers": ten(("Green", 4), ("lime", 6)), "answer_type": "other"},
        {"question_id": 30, "answers": ten(("x", 10)), "answer_type": "other"}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    em = fake(answers={"red": "Red.", "green": "the green"})
    metrics, sections, figures = evaluate_vqa(em, tmp_path / "q.json", tmp_path / "a.json", tmp_path / "imgs",
                                              tmp_path / "out", progress=False, batch_size=2)
    # "Red." -> "red": 2 of 10 agree; leave one out: 2 subsets keep one "red" (1/3), 8 keep both (2/3) -> 0.6
    # "the green" -> "green" = "Green": 4 agree, every subset keeps >= 3 -> 1.0
    assert question_accuracy("Red.", ["red"] * 2 + ["maroon"] * 8) == pytest.approx(0.6)
    assert metrics["accuracy"] == pytest.approx((0.6 + 0.6 + 1.0) / 3)
    assert metrics["per_answer_type"]["other"] == {"accuracy": pytest.approx(0.8), "n": 2}
    assert metrics["per_answer_type"]["yes/no"] == {"accuracy": pytest.approx(0.6), "n": 1}
    assert metrics["n_questions"] == 3 and metrics["questions_skipped"] == 1 and metrics["skipped"]["missing"] == 1
    # the prompt: bos + "what colour? answer:" without eos, one per question, greedy with 10 new tokens
    prompts = [p for p, _ in em.model.prompts]
    tok = em.tokenizer
    assert [tok.decode(torch.tensor([row + [2]]))[0] for row in prompts[0]] == ["what colour? answer:", "is it red? answer:"]
    assert all(row[0] == 1 and 2 not in row for batch in prompts for row in batch)
    assert em.model.prompts[0][1] == {"max_new_tokens": 10}
    answers = json.loads((tmp_path / "out" / "answers.json").read_text())
    assert answers == [{"question_id": 10, "answer": "Red."}, {"question_id": 11, "answer": "Red."},
                       {"question_id": 20, "answer": "the green"}]
    assert "| yes/no | 1 | 0.600 |" in sections[0]
    assert all(png is not None and png.stat().st_size > 0 for _, png in figures)


def test_vqa_prompt_template_and_limit(tmp_path):
    from mammut.eval.vqa import evaluate_vqa

    draw(tmp_path / "5.png", "blue")
    qs = {"questions": [{"question_id": j, "image_id": 5, "question": f"q{j}?"} for j in range(6)]}
    ans = {"annotations": [{"question_id": j, "answers": [{"answer": "blue"}]} for j in range(6)]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ans))
    em = fake(answers={"blue": "blue"})
    metrics, _, _ = evaluate_vqa(em, tmp_path / "q.json", tmp_path / "a.json", tmp_path, tmp_path / "out",
                                 prompt="Question: {question} Answer:", limit=4, progress=False)
    assert metrics["n_questions"] == 4 and metrics["accuracy"] == 1.0  # one answer each: exact match
    assert (metrics["limit"], metrics["n_total"], metrics["comparable_to_published"]) == (4, 6, False)
    from mammut.eval.report import write_benchmark_report

    report = (write_benchmark_report(tmp_path / "rep", "VQA", metrics) / "report.md").read_text()
    assert "- full set: 6 questions; --limit 4 (a seeded random subset); comparable to published numbers: NO" in report
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["limit"] == 4
    metrics, _, _ = evaluate_vqa(em, tmp_path / "q.json", tmp_path / "a.json", tmp_path, tmp_path / "out",
                                 progress=False)
    assert (metrics["limit"], metrics["n_total"], metrics["comparable_to_published"]) == (None, 6, True)
    texts = [em.tokenizer.decode(torch.tensor([row + [2]]))[0] for row in em.model.prompts[0][0]]
    assert all(t.startswith("Question: q") and t.endswith("? Answer:") for t in texts)
    with pytest.raises(ValueError, match=r"--prompt: expected a template with a \{question\} field"):
        evaluate_vqa(em, tmp_path / "q.json", tmp_path / "a.json", tmp_path, tmp_path / "out", prompt="{q}")


# ----------------------------------------------------------------------------- plumbing


def test_bf16_autocast_is_used(tmp_path):
    seen = []

    class Probe(FakeModel):
        def embed_image(self, images):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().embed_image(images)

    tok = WordTokenizer()
    em = EvalModel(Probe(tok), preprocess, tok, "probe", torch.device("cpu"), bf16=True)
    em.embed_images(torch.rand(2, 3))
    em.bf16 = False
    em.embed_images(torch.rand(2, 3))
    assert seen == [True, False]


def test_seeded_subset():
    from mammut.eval.images import seeded_subset

    a, b = seeded_subset(100, 10), seeded_subset(100, 10)
    assert a == b and a == sorted(a) and len(set(a)) == 10 and seeded_subset(5, 10) == list(range(5))

"""The vqa task: exact, balanced questions; VQAv2 normalisation and accuracy; loss on answer tokens
only; training, evaluation and exact resume for MaMMUT, CoCa and FlamingoPaLM."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from mammut.data.scenes import RELATIONS, EmojiScenes, relation_from_boxes
from mammut.data.tokenizer import Tokenizer, train_bpe
from mammut.data.vqa import OPPOSITE, QUESTION_TYPES, EmojiQuestions, question_texts
from mammut.eval.vqa import accuracy_by_type, normalize_answer, vqa_accuracy, vqa_table
from mammut.losses import IGNORE_INDEX
from mammut.models import get_model_spec
from mammut.tasks.vqa import Vqa, VqaCollate, VqaEncoder, VqaSource
from mammut.train.build import MEDIA_TOKEN
from mammut.train.checkpointing import load_weights
from mammut.train.config import ConfigError, load_config
from mammut.data.sources import emoji_corpus
from mammut.train.loop import Trainer

MODELS = ("mammut", "coca", "flamingo_palm")
SMALL = {"mammut": ["--model.depth", "2"], "coca": ["--model.unimodal_depth", "1", "--model.multimodal_depth", "1"],
         "flamingo_palm": ["--model.depth", "2"]}


def vqa_tiny(out: Path, model: str = "mammut", *extra: str):
    return load_config("vqa-tiny", ["--model.name", model, "--train.out_dir", str(out), "--train.progress", "false",
                                    "--train.threads", "1", *SMALL[model], *extra])


# ----------------------------------------------------------------------------- questions


def check_answer(sample) -> None:
    """The answer, recomputed from the scene's names and boxes."""
    scene, q, a = sample.scene, sample.question, sample.answer
    box = dict(zip(scene.names, scene.boxes))
    if sample.qtype == "exists":
        name = re.fullmatch(r"is there a (.+)\?", q).group(1)
        assert a == ("yes" if name in scene.names else "no")
    elif sample.qtype == "count":
        assert q == "how many emoji are there?" and a == str(scene.n_objects)
    elif sample.qtype == "relation":
        rel, anchor = re.fullmatch(r"what is (left of|right of|above|below) the (.+)\?", q).groups()
        holders = [n for n in scene.names if n != anchor and relation_from_boxes(box[n], box[anchor]) == rel]
        assert holders == [a]  # exactly one emoji in that relation: the answer
    else:
        first, rel, second = re.fullmatch(r"is the (.+) (left of|right of|above|below) the (.+)\?", q).groups()
        true = relation_from_boxes(box[first], box[second])
        assert true in (rel, OPPOSITE[rel])  # a "no" asks the opposite, never an ambiguous relation
        assert a == ("yes" if true == rel else "no")


@pytest.mark.parametrize("max_objects", [2, 3])
def test_answers_are_exact_from_the_scene_metadata(max_objects):
    qs = EmojiQuestions(EmojiScenes(32, 20, max_objects), seed=3)
    samples = [qs[i] for i in range(400)]
    for s in samples:
        check_answer(s)
    assert {s.scene.n_objects for s in samples} == set(range(1, max_objects + 1))


def test_questions_are_balanced_so_text_alone_guesses_badly():
    qs = EmojiQuestions(EmojiScenes(32, 20, 3), seed=0)
    samples = [qs[i] for i in range(960)]
    by_type = {t: [s for s in samples if s.qtype == t] for t in QUESTION_TYPES}
    assert all(len(v) == 240 for v in by_type.values())
    for t in ("exists", "spatial"):
        assert Counter(s.answer for s in by_type[t]) == {"yes": 120, "no": 120}
    assert Counter(s.answer for s in by_type["count"]) == {"1": 80, "2": 80, "3": 80}
    # the asked relation is balanced, and in spatial questions independent of the answer
    assert Counter(s.question.split(" the ")[0][len("what is "):] for s in by_type["relation"]) == {r: 60 for r in RELATIONS}
    for answer in ("yes", "no"):
        rels = Counter(next(r for r in RELATIONS if f" {r} the " in s.question) for s in by_type["spatial"] if s.answer == answer)
        assert rels == {r: 30 for r in RELATIONS}
    # "what is left of X" needs the image: no answer name is common
    assert Counter(s.answer for s in by_type["relation"]).most_common(1)[0][1] / 240 < 0.15


def test_questions_are_pure_functions_of_the_index_and_heldout_uses_heldout_pairs():
    a, b = EmojiQuestions(EmojiScenes(32, 20, 2), seed=5), EmojiQuestions(EmojiScenes(32, 20, 2), seed=5)
    later = [(b[i].question, b[i].answer, b[i].scene.index) for i in (7, 3)]
    assert [(a[i].question, a[i].answer, a[i].scene.index) for i in (7, 3)] == later
    assert torch.equal(a[3].image, b[3].image)
    assert a.sample(3, attempt=1).question != a[3].question or a.sample(3, attempt=1).scene.index != a[3].scene.index
    held = EmojiQuestions(EmojiScenes(32, 20, 2, split="heldout"), seed=0)
    ds = held.scenes
    for i in range(80):
        ids = held[i].scene.emoji_ids
        if len(ids) == 2:
            assert ds.pair_is_heldout(*ids)
    with pytest.raises(ValueError, match=r"data.max_objects: .* expected max_objects >= 2, got 1"):
        EmojiQuestions(EmojiScenes(32, 20, 1))


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), ("  Two\tdogs. ", "2 dogs"), ("the cat's toy!", "cat's toy"), ("dont", "don't"),
    ("couldnt've", "couldn't've"), ("3.5", "3.5"), ("end.", "end"), ("100,978", "100978"),
    ("red,blue", "red blue"), ("ice-cream", "ice cream"), ("2:50 pm", "2:50 pm"), ("An apple", "apple"),
    ("none", "0"), ("TEN", "10"), ("(a) hot dog?", "hot dog"), ("its", "its"),
    # the official code's punctuation list and rules: '$', '#', '&' kept; a mark next to a space is
    # deleted, else spaced; a digit,digit anywhere deletes every listed mark
    ("$5", "$5"), ("#1", "#1"), ("a & b", "& b"), ("x-ray, left", "x ray left"), ("1,000-2,000", "10002000"),
    ("yes!", "yes"), ("Im", "im"), ("shes", "shes"), ("couldntve", "couldntve"), ("somebody'd", "somebodyd"),
])
def test_vqav2_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqav2_accuracy_rule():
    assert vqa_accuracy("Two.", "2") == 1.0 and vqa_accuracy("3", "2") == 0.0  # one reference: exact match
    assert vqa_accuracy("cat", ["cat", "dog"]) == 0.5  # min(1 / min(3, 2), 1)
    refs = ["cat", "cat", "dog", "bird"]
    assert vqa_accuracy("a cat", refs) == pytest.approx(2 / 3) and vqa_accuracy("dog", refs) == pytest.approx(1 / 3)
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", ten) == 1.0  # three annotators agree: fully right
    # VQAv2's official average over the 10 sets of 9: k matches -> (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    assert vqa_accuracy("2", ten, leave_one_out=True) == pytest.approx(0.9)
    assert vqa_accuracy("3", ten, leave_one_out=True) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["2", "2"] + ["x"] * 8, leave_one_out=True) == pytest.approx(0.6)
    assert vqa_accuracy("2", ["2"] + ["x"] * 9, leave_one_out=True) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("prediction, references, expected", [
    # ten identical references: compared as given (stripped only), as the official evaluation does
    ("yes.", ["yes"] * 10, 0.0), ("two", ["2"] * 10, 0.0), ("the dog", ["dog"] * 10, 0.0), ("Yes", ["yes"] * 10, 0.0),
    (" yes\n", ["yes"] * 10, 1.0), ("yes", ["yes"] * 10, 1.0),
    # references that differ: both sides processed
    ("Two.", ["2"] * 4 + ["3"] * 6, 1.0), ("the dog", ["dog"] * 9 + ["a dog!"], 1.0),
    ("yes.", ["yes"] * 2 + ["no"] * 8, pytest.approx(0.6)),
])
def test_vqav2_processes_answers_only_where_the_references_differ(prediction, references, expected):
    assert vqa_accuracy(prediction, references, leave_one_out=True) == expected


def test_accuracy_per_type_with_baseline_and_table():
    res = accuracy_by_type(["yes", "Two", "cat", "no"], ["yes", "2", "dog", "yes"], ["exists", "count", "relation", "exists"],
                           baseline=["no", "1", "dog", "yes"])
    assert res["accuracy"] == 0.5 and res["baseline_accuracy"] == 0.5 and res["n"] == 4
    assert res["per_type"]["exists"] == {"n": 2, "accuracy": 0.5, "majority_answer": "yes", "majority_accuracy": 1.0,
                                         "baseline_accuracy": 0.5}
    assert res["per_type"]["count"]["accuracy"] == 1.0 and res["per_type"]["relation"]["baseline_accuracy"] == 1.0
    table = vqa_table(res)
    assert "| exists | 2 | 0.500 | 0.500 | 1.000 ('yes') |" in table and "| **all** | 4 | 0.500 | 0.500 |" in table


# ----------------------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    names = EmojiScenes(32, 20, 2).class_names()
    return train_bpe(emoji_corpus(names) + question_texts(names), vocab_size=600, min_frequency=1,
                     extra_special=(MEDIA_TOKEN,))


def _model_and_batch(name: str, tok: Tokenizer):
    spec = get_model_spec(name)
    media_id = tok.special_id(MEDIA_TOKEN) if spec.media else None
    extra = {"media_token_id": media_id} if spec.media else {}
    model = spec.build_tiny(num_tokens=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, **extra)
    cfg = vqa_tiny(Path("unused"), name)
    source = VqaSource(cfg.data, "train", 0, VqaEncoder(tok, media_id))
    items = [source(i) for i in range(8)]
    return model, items, VqaCollate(tok.pad_id, spec.media)(items)


@pytest.mark.parametrize("name", MODELS)
def test_loss_reads_only_the_answer_tokens(name, tokenizer):
    model, items, batch = _model_and_batch(name, tokenizer)
    text, labels = batch["text"], batch["labels"]
    for row, it in enumerate(items):  # labels: the answer and its EOS, each at the position before it
        p, a = len(it["prompt"]), len(it["answer_ids"])
        assert labels[row, p - 1: p - 1 + a].tolist() == it["answer_ids"] == text[row, p: p + a].tolist()
        assert (labels[row, : p - 1] == IGNORE_INDEX).all() and (labels[row, p - 1 + a:] == IGNORE_INDEX).all()
    if get_model_spec(name).media:
        assert batch["images"].shape[1] == 1 and (text[:, 1] == model.config.media_token_id).all()
    task = Vqa(vqa_tiny(Path("unused"), name))
    loss = task.loss(model, batch)["loss"]

    # a question position's label changed to another "no target" value: the very same loss
    prompt = torch.zeros_like(labels, dtype=torch.bool)
    for row, it in enumerate(items):
        prompt[row, : len(it["prompt"]) - 1] = True
    same = task.loss(model, {**batch, "labels": labels.masked_fill(prompt, tokenizer.pad_id)})["loss"]
    assert torch.equal(loss, same)
    # ... and made a target (the next question token), it would count
    unmasked = torch.where(prompt, torch.cat([text[:, 1:], text[:, :1]], 1), labels)
    assert not torch.allclose(task.loss(model, {**batch, "labels": unmasked})["loss"], loss)

    # the gradient comes from the answer positions only
    states: dict[str, torch.Tensor] = {}
    decode_hidden = model.decode_hidden

    def keep_states(*args, **kwargs):
        h = decode_hidden(*args, **kwargs)
        h.retain_grad()
        states["h"] = h
        return h

    model.decode_hidden = keep_states
    task.loss(model, batch)["loss"].backward()
    grad = states["h"].grad.abs().sum(-1)
    assert (grad[labels == IGNORE_INDEX] == 0).all() and (grad[labels != IGNORE_INDEX] > 0).all()


# ----------------------------------------------------------------------------- training and evaluation


@pytest.mark.parametrize("name", MODELS)
def test_vqa_tiny_trains_each_model(name, tmp_path):
    trainer = Trainer(vqa_tiny(tmp_path, name))
    losses = trainer.fit().losses
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    if name == "flamingo_palm":  # the run's BPE got the media token, and the model marks images with it
        tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
        saved = load_config(tmp_path / "config.yaml").model
        assert tok.special_id(MEDIA_TOKEN) is not None and saved["media_token_id"] == tok.special_id(MEDIA_TOKEN)


def test_mammut_eval_writes_per_type_accuracy_and_text_only_baseline(tmp_path, capsys):
    from mammut.cli import main

    run = tmp_path / "run"
    Trainer(vqa_tiny(run, "mammut", "--train.steps", "4", "--train.eval_every", "2")).fit()
    quick = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in quick if r.get("kind") == "eval" and 0 <= r["vqa_acc"] <= 1] == [2, 4]
    assert main(["eval", str(run), "--n", "16"]) == 0
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    vqa = metrics["vqa"]
    assert vqa["n"] == 16 and set(vqa["per_type"]) == set(QUESTION_TYPES)
    for row in vqa["per_type"].values():
        assert row["n"] == 4 and 0 <= row["accuracy"] <= 1 and 0 <= row["baseline_accuracy"] <= 1
    assert metrics["eval_split"]["held_out"] and metrics["task"] == "vqa"
    report = (run / "report" / "report.md").read_text()
    assert "## VQA accuracy on 16 held-out questions" in report and "text-only (image blanked)" in report
    assert (run / "report" / "scenes.png").is_file()


# MaMMUT and CoCa have parameters the captioning objective never reaches (contrastive heads):
# no gradient, hence no AdamW state; resume must still be exact (optimiser state loaded non-strictly)
@pytest.mark.parametrize("name", ["mammut", "coca", "flamingo_palm"])
def test_resume_reads_the_same_batches_and_gives_the_same_losses(name, tmp_path):
    args = ("--train.steps", "6", "--train.save_every", "3", "--train.batch_size", "8", "--train.grad_accum", "2")
    full = Trainer(vqa_tiny(tmp_path / "a", name, *args)).fit().losses
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # as if stopped after step 3
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    resumed = Trainer(vqa_tiny(tmp_path / "b", name, *args), resume=True)
    assert resumed.step == 3
    assert resumed.fit().losses == full[3:]


def test_fine_tunes_from_a_pretraining_run(tmp_path):
    pre = tmp_path / "pre"
    Trainer(load_config("tiny", ["--train.out_dir", str(pre), "--train.steps", "2", "--train.progress", "false"])).fit()
    trainer = Trainer(vqa_tiny(tmp_path / "vqa", "mammut", "--train.init_from", str(pre)))
    weights = load_weights(next((pre / "checkpoints").iterdir()) / "model.safetensors")
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())
    assert (tmp_path / "vqa" / "tokenizer.json").read_bytes() == (pre / "tokenizer.json").read_bytes()
    assert len(trainer.fit(eval_fn=None).losses) == 30


def test_refuses_impossible_setups(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"data.max_objects: .* expected >= 2, got 1"):
        Vqa(vqa_tiny(tmp_path, "mammut", "--data.max_objects", "1"))
    plain = tmp_path / "plain.json"
    names = EmojiScenes(32, 20, 2).class_names()
    train_bpe(emoji_corpus(names), vocab_size=500, path=plain, min_frequency=1)  # no <image>
    with pytest.raises(ValueError, match=r"data.tokenizer: expected a tokenizer with the special token\(s\) \['<image>'\]"):
        Trainer(vqa_tiny(tmp_path / "f", "flamingo_palm", "--data.tokenizer", str(plain)))  # before any model is built
    task = Vqa(vqa_tiny(tmp_path, "mammut"))
    with pytest.raises(ValueError, match=r"--data: the vqa task .* got 'x.csv'"):
        task.evaluate(torch.nn.Linear(1, 1), tokenizer, data="x.csv")


def test_presets_load():
    assert load_config("vqa").train.task == "vqa" and load_config("vqa").model["name"] == "mammut"
    for name in MODELS:
        assert load_config("vqa-tiny", ["--model.name", name]).model["name"] == name

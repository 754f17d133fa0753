"""The ``interleaved`` task: Flamingo-style sequences of emoji scenes and their captions.

Sequence building (one media token per image, captions in order, deterministic by index,
held-out scenes only in the held-out split), the loss (never on media tokens or padding;
padded images never read), the frozen-LM recipe, a ``flamingo-tiny`` Trainer run, ``mammut
eval`` and exact resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mammut.data.interleaved import InterleavedCollate, InterleavedSource, build_prompt, caption_ids
from mammut.data.scenes import EmojiScenes
from mammut.data.tokenizer import SPECIAL_TOKENS, train_bpe
from mammut.losses import IGNORE_INDEX
from mammut.models import get_model_spec
from mammut.tasks import get_task
from mammut.train.build import MEDIA_TOKEN, build_model, resolve_model_config
from mammut.train.config import load_config
from mammut.data.sources import DATA_SEED, emoji_corpus, emoji_dataset
from mammut.train.loop import Trainer
from mammut.train.optim import build_optimizer

PRESET = "flamingo-tiny"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    """A BPE with ``<image>`` for the preset's emoji (what ``build_tokenizer`` trains for this task)."""
    cfg = load_config(PRESET)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(emoji_corpus(emoji_dataset(cfg.data).class_names()), vocab_size=cfg.data.vocab_size, path=path,
              min_frequency=1, extra_special=(MEDIA_TOKEN,))
    return path


def run_cfg(tok_path: Path, out: Path, *extra: str):
    return load_config(PRESET, ["--train.out_dir", str(out), "--train.progress", "false", "--train.threads", "1",
                                "--data.tokenizer", str(tok_path), *extra])


def task_and_tok(tok_path: Path, out: Path, *extra: str):
    cfg = run_cfg(tok_path, out, *extra)
    from mammut.data.tokenizer import Tokenizer

    return cfg, get_task("interleaved")(cfg), Tokenizer.from_file(tok_path)


# ----------------------------------------------------------------------------- tokenizer


def test_extra_special_tokens_keep_the_usual_ids_and_are_one_id(tok_path):
    from mammut.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    media = tok.special_id(MEDIA_TOKEN)
    assert media == len(SPECIAL_TOKENS)
    assert tok.special_id("a") is None and tok.special_id("<video>") is None
    ids = tok.hf.encode(f"{MEDIA_TOKEN} a croissant", add_special_tokens=False).ids
    assert ids[0] == media and media not in ids[1:]
    assert tok.decode([[tok.bos_id, media, *ids[1:], tok.eos_id]]) == ["a croissant"]
    with pytest.raises(TypeError, match="extra_special must be a sequence of token strings"):
        train_bpe(["a b"], vocab_size=300, extra_special=MEDIA_TOKEN)
    with pytest.raises(ValueError, match="distinct"):
        train_bpe(["a b"], vocab_size=300, extra_special=("[PAD]",))


# ----------------------------------------------------------------------------- sequences


def test_sequences_hold_one_media_token_per_image_and_the_captions_in_order(tok_path, tmp_path):
    cfg, task, tok = task_and_tok(tok_path, tmp_path / "run")
    media = tok.special_id(MEDIA_TOKEN)
    source = InterleavedSource(emoji_dataset(cfg.data), task.max_media, seed=0)
    collate = InterleavedCollate(tok, media, cfg.data.max_len)
    samples = [source(i) for i in range(24)]
    batch = collate(samples)
    assert {s.num_media for s in samples} == {1, 2, 3}  # t varies per row, 1..num_time_embeds
    assert batch["images"].shape == (24, 3, 3, cfg.data.image_size, cfg.data.image_size)
    for row, s in enumerate(samples):
        ids = batch["text"][row]
        ids = ids[ids != tok.pad_id].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1] == media
        assert ids.count(media) == s.num_media  # one media token per image
        pieces, cur = [], None
        for i in ids[1:-1]:
            if i == media:
                cur = []
                pieces.append(cur)
            else:
                cur.append(i)
        assert tok.decode(pieces) == list(s.captions)  # captions in image order
        assert torch.equal(batch["images"][row, : s.num_media], s.images)
        assert not batch["images"][row, s.num_media:].any()  # zero images pad shorter rows
        for k, j in enumerate(s.scene_indices):  # each image is the scene its caption describes
            assert source.scenes.scene(j).caption == s.captions[k]
    # deterministic by index: a fresh source gives the same sequence; another seed other counts
    again = InterleavedSource(emoji_dataset(cfg.data), task.max_media, seed=0)(7)
    assert again.captions == samples[7].captions and torch.equal(again.images, samples[7].images)
    other = InterleavedSource(emoji_dataset(cfg.data), task.max_media, seed=1)
    assert [other.num_media(i) for i in range(24)] != [s.num_media for s in samples]
    # sequences never share a scene
    used = [j for s in samples for j in s.scene_indices]
    assert len(used) == len(set(used))


def test_heldout_sequences_hold_only_heldout_scenes(tok_path, tmp_path):
    cfg, task, tok = task_and_tok(tok_path, tmp_path / "run")
    train = emoji_dataset(cfg.data, "train")
    source = InterleavedSource(train, task.max_media, seed=0)
    for i in range(150):
        for j in source.scene_indices(i):
            ids = train.scene(j).emoji_ids
            assert len(ids) == 1 or not train.pair_is_heldout(*ids)
    held, skipped = task.heldout_sequences(tok, 40)
    assert len(held) == 40 and skipped == 0
    heldout = EmojiScenes(cfg.data.image_size, cfg.data.num_emoji, cfg.data.max_objects, split="heldout",
                          seed=DATA_SEED, min_objects=cfg.data.min_objects, vocab_seed=cfg.data.vocab_seed)
    pairs = 0
    for s in held:
        assert 2 <= s.num_media <= task.max_media  # there is always an earlier scene for the context
        for k, j in enumerate(s.scene_indices):
            scene = heldout.scene(j)
            assert scene.caption == s.captions[k] and torch.equal(scene.image, s.images[k])
            if scene.n_objects == 2:
                pairs += 1
                assert heldout.pair_is_heldout(*scene.emoji_ids)
    assert pairs > 10


def test_long_sequences_lose_trailing_scenes(tok_path, tmp_path):
    cfg, task, tok = task_and_tok(tok_path, tmp_path / "run")
    media = tok.special_id(MEDIA_TOKEN)
    source = InterleavedSource(emoji_dataset(cfg.data), 3, seed=0, min_media=3)
    sample = source(0)
    full = len(build_prompt(caption_ids(tok, sample.captions), media_id=media, bos_id=tok.bos_id))  # + EOS - last media
    ids, kept = InterleavedCollate(tok, media, full - 1).fit(sample)
    assert kept == 2 and len(ids) <= full - 1 and ids.count(media) == 2
    first = len(caption_ids(tok, sample.captions[:1])[0])
    with pytest.raises(ValueError, match="data.max_len: sequence 0 holds one scene"):
        InterleavedCollate(tok, media, first + 2, truncate=False).fit(sample)
    ids, kept = InterleavedCollate(tok, media, first + 2).fit(sample)
    assert kept == 1 and len(ids) == first + 2 and ids[-1] == tok.eos_id


# ----------------------------------------------------------------------------- the loss


def tiny_setup(tok_path: Path, out: Path, *extra: str):
    cfg, task, tok = task_and_tok(tok_path, out, *extra)
    model = build_model(resolve_model_config(cfg, tok))
    batch = next(task.train_batches(tok, rank=0, world_size=1, start_step=0))[0]
    return cfg, task, tok, model, batch


def test_loss_targets_caption_tokens_and_eos_only(tok_path, tmp_path):
    cfg, task, tok, model, batch = tiny_setup(tok_path, tmp_path / "run")
    media = tok.special_id(MEDIA_TOKEN)
    assert model.config.media_token_id == media
    for n, p in model.named_parameters():  # open the gates, so the images matter
        if n.endswith("_gate"):
            p.data.fill_(0.5)
    text, labels = batch["text"], batch["labels"]
    nxt = text[:, 1:]
    targeted = labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(targeted, (nxt != media) & (nxt != tok.pad_id)) and (labels[:, -1] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, :-1][targeted], nxt[targeted])
    # per row: every caption token and the EOS, nothing else
    for row in range(len(text)):
        ids = text[row][text[row] != tok.pad_id].tolist()
        assert int(targeted[row].sum()) == len(ids) - 1 - ids.count(media)
    loss = task.loss(model, batch)["loss"]
    logits = model.decode(text, model.image_context(batch["images"]))
    manual = F.cross_entropy(logits[:, :-1][targeted], nxt[targeted])
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    # padded images are never read: each row alone, with only its own images, gives the same loss
    weights, total = [], 0.0
    for row in range(len(text)):
        t = int((text[row] == media).sum())
        one = {"text": text[row:row + 1], "labels": labels[row:row + 1], "images": batch["images"][row:row + 1, :t]}
        n = int(targeted[row].sum())
        total += float(task.loss(model, one)["loss"].detach()) * n
        weights.append(n)
    assert total / sum(weights) == pytest.approx(float(loss.detach()), rel=1e-5)


def test_token_shares_count_caption_targets_across_accumulation(tok_path, tmp_path):
    # the token mean of the whole step, with 1 or 2 micro-batches
    args = ("--train.steps", "3", "--train.log_every", "1", "--train.batch_size", "8")
    full = Trainer(run_cfg(tok_path, tmp_path / "a", *args)).fit().losses
    accum = Trainer(run_cfg(tok_path, tmp_path / "b", *args, "--train.grad_accum", "2")).fit().losses
    torch.testing.assert_close(torch.tensor(accum), torch.tensor(full), rtol=1e-4, atol=1e-5)


def test_freeze_lm_trains_only_the_perceiver_and_gated_blocks(tok_path, tmp_path):
    cfg, task, tok, model, batch = tiny_setup(tok_path, tmp_path / "run", "--model.freeze_lm", "true")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("perceiver.") or ".xattn." in n for n in trainable)
    assert any(n.startswith("perceiver.") for n in trainable) and any(n.endswith("attn_gate") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg.optim)
    for step in range(3):  # the gates open on step 1; the perceiver gets gradients from step 2
        batch = next(task.train_batches(tok, rank=0, world_size=1, start_step=step))[0]
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch)["loss"].backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None and torch.equal(p, before[n]), n  # LM, logits and image encoder as they were


def test_tokenizer_without_the_media_token_is_refused(tmp_path):
    cfg = load_config(PRESET, ["--train.out_dir", str(tmp_path / "run")])
    tok = train_bpe(emoji_corpus(emoji_dataset(cfg.data).class_names()), vocab_size=600, min_frequency=1)
    task = get_task("interleaved")(cfg)
    with pytest.raises(ValueError, match=r"data.tokenizer: train.task='interleaved' expected a tokenizer with the special token '<image>'"):
        task.train_batches(tok, rank=0, world_size=1, start_step=0)  # before the first step is asked for


def test_a_model_with_another_media_token_is_refused(tok_path, tmp_path):
    cfg, task, tok, _, batch = tiny_setup(tok_path, tmp_path / "run")
    other = get_model_spec("flamingo_palm").build_tiny(num_tokens=tok.vocab_size, media_token_id=4)
    with pytest.raises(ValueError, match=r"model.media_token_id: expected the tokenizer's '<image>' id 5, got 4"):
        task.loss(other, batch)


# ----------------------------------------------------------------------------- training and evaluation


def test_flamingo_tiny_learns_and_mammut_eval_scores_the_last_image(tok_path, tmp_path, capsys):
    from mammut.cli import main

    run = tmp_path / "run"
    result = Trainer(run_cfg(tok_path, run, "--train.steps", "25")).fit()
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert result.step == 25 and last < first - 1.5, (first, last)
    assert main(["eval", str(run), "--n", "12"]) == 0
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["task"] == "interleaved" and metrics["eval_split"]["held_out"] is True
    assert metrics["eval_split"]["n_sequences"] == 12
    last_image = metrics["last_image"]
    for condition in ("context", "no_context"):
        scores = last_image[condition]
        assert scores["n"] == 12 and {"bleu4", "cider_d", "emoji_acc_all", "emoji_acc_single", "emoji_acc_pair"} <= set(scores)
        assert 0.0 <= scores["bleu4"] <= 1.0 and 0.0 <= scores["emoji_acc_all"] <= 1.0
    assert last_image["gain"]["cider_d"] == pytest.approx(last_image["context"]["cider_d"] - last_image["no_context"]["cider_d"])
    assert metrics["caption"]["bleu4"] == last_image["context"]["bleu4"]
    assert sum(r["n"] for r in last_image["emoji_acc_by_earlier_scenes"].values()) == 12
    report = (run / "report" / "report.md").read_text()
    assert "Last-image captions (12 held-out sequences)" in report and "| BLEU-4 |" in report
    with pytest.raises(ValueError, match="--data: train.task='interleaved' evaluates on its built-in"):
        get_task("interleaved")(run_cfg(tok_path, run)).evaluate(None, None, data="x.csv")


def test_last_caption_prompts_hold_the_earlier_scenes(tok_path, tmp_path):
    cfg, task, tok, model, _ = tiny_setup(tok_path, tmp_path / "run")
    held, _ = task.heldout_sequences(tok, 6)
    seen = []

    def spy(images, prompt=None, **kwargs):
        seen.append((images.shape, prompt))
        return torch.full((images.shape[0], 1), tok.eos_id)

    model.generate = spy
    task.last_captions(model, tok, held, context=True)
    task.last_captions(model, tok, held, context=False)
    media = tok.special_id(MEDIA_TOKEN)
    with_ctx = {tuple(p) for shape, prompts in seen[:-1] for p in prompts}
    for s in held:
        earlier = caption_ids(tok, s.captions[:-1])
        assert tuple(build_prompt(earlier, media_id=media, bos_id=tok.bos_id)) in with_ctx
    shape, prompts = seen[-1]
    assert shape[:2] == (6, 1) and all(p == [tok.bos_id, media] for p in prompts)  # the last image alone


def test_resume_reads_and_trains_exactly_as_an_uninterrupted_run(tok_path, tmp_path):
    args = ("--train.steps", "6", "--train.log_every", "1", "--train.batch_size", "8")
    straight = Trainer(run_cfg(tok_path, tmp_path / "a", *args)).fit().losses
    first = Trainer(run_cfg(tok_path, tmp_path / "b", *args))
    batches = first.task.train_batches(first.tokenizer, rank=0, world_size=1, start_step=0)
    head = [first.train_step(next(batches))["loss"] for _ in range(3)]
    first.save()  # stopped at step 3
    resumed = Trainer(run_cfg(tok_path, tmp_path / "b", *args), resume=True)
    assert resumed.step == 3
    assert head + resumed.fit().losses == straight


def test_a_random_frozen_image_encoder_is_warned_about(tok_path, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="mammut.tasks.interleaved"):
        task_and_tok(tok_path, tmp_path / "a")
    assert "train.image_encoder_from" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mammut.tasks.interleaved"):
        task_and_tok(tok_path, tmp_path / "b", "--train.image_encoder_from", str(tmp_path / "pretrained"))
    assert "image_encoder_from" not in caplog.text

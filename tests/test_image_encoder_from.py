"""``train.image_encoder_from``: a run's built-in ViT (its ``model.vit`` section and its
``img_encoder.*`` weights) started from another run or an exported model folder.

A 2-step ``tiny`` MaMMUT run is the source; ``flamingo-tiny`` (frozen encoder) and ``tiny``
(trained encoder) start from it. Errors: together with ``train.init_from``, a source without
a ViT, a source whose tensors do not fit, another image size, a missing path (one CLI line,
exit 2). ``--resume`` takes the encoder from the checkpoint, not from the source again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mammut.cli import main
from mammut.train.checkpointing import latest_checkpoint, load_weights
from mammut.train.config import ConfigError, load_config
from mammut.train.loop import InitSource, Trainer

PREFIX = "img_encoder."


def _cfg(preset: str, out: Path, *extra: str):
    return load_config(preset, ["--train.out_dir", str(out), "--train.progress", "false", "--train.threads", "1",
                                *extra])


def _encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_weights(path).items() if k.startswith(PREFIX)}


def _saved_model(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["model"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 2-step ``tiny`` MaMMUT run (its ViT moved away from the initialisation)."""
    run = tmp_path_factory.mktemp("src") / "tiny"
    Trainer(_cfg("tiny", run, "--train.steps", "2")).fit()
    return run


def _edited_copy(source: Path, dest: Path, edit) -> Path:
    """A copy of the source run whose config.yaml ``model`` section went through ``edit``."""
    shutil.copytree(source, dest)
    saved = yaml.safe_load((dest / "config.yaml").read_text())
    edit(saved["model"])
    (dest / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return dest


def test_the_key_is_a_dotted_override_resolved_to_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("flamingo-tiny", ["--train.image_encoder_from", "runs/pre"])
    assert cfg.train.image_encoder_from == str(tmp_path / "runs" / "pre")
    assert load_config("flamingo-tiny").train.image_encoder_from is None


def test_flamingo_starts_from_the_source_encoder_and_resume_does_not_reload_it(source, tmp_path, caplog, monkeypatch):
    src_weights = latest_checkpoint(source) / "model.safetensors"
    expected = _encoder_tensors(src_weights)
    # the source is a copy that disappears before --resume: the encoder must come from the checkpoint
    copy = tmp_path / "src-copy"
    shutil.copytree(source, copy)
    run = tmp_path / "flamingo"
    # this config's ViT is one block shallower: the source's section replaces it (so its tensors fit)
    args = ("--train.image_encoder_from", str(copy), "--model.vit.depth", "1")
    with caplog.at_level(logging.INFO, logger="mammut.train.loop"):
        trainer = Trainer(_cfg("flamingo-tiny", run, "--train.steps", "1", *args))
        trainer.fit()
    assert "model.vit.depth taken from the source" in caplog.text
    assert f"loaded {len(expected)} image-encoder tensors" in caplog.text
    # frozen by FlamingoPaLM: still the source's tensors after training
    got = _encoder_tensors(latest_checkpoint(run) / "model.safetensors")
    assert sorted(got) == sorted(expected) and len(expected) > 4
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    # config.yaml records the source's ViT: --resume and mammut eval rebuild the same architecture
    assert _saved_model(run)["vit"] == _saved_model(source)["vit"]
    assert _saved_model(run)["vit"]["depth"] == 2

    shutil.rmtree(copy)

    def must_not_run(self, model, key="train.image_encoder_from"):
        raise AssertionError("the encoder was loaded again on --resume")

    monkeypatch.setattr(InitSource, "load_image_encoder_into", must_not_run)
    resumed = Trainer(_cfg("flamingo-tiny", run, "--train.steps", "2", *args), resume=True)
    assert resumed.step == 1
    for k, v in expected.items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert resumed.fit().step == 2


def test_mammut_from_an_exported_model_folder_keeps_training_its_encoder(source, tmp_path):
    from mammut.cli import _export

    _export(source)  # <run>/model: config.json + model.safetensors + tokenizer.json
    exported = source / "model"
    expected = _encoder_tensors(exported / "model.safetensors")
    trainer = Trainer(_cfg("tiny", tmp_path / "run", "--train.image_encoder_from", str(exported),
                           "--train.steps", "1"))
    state = trainer.model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    # MaMMUT trains its encoder on: the key only starts it
    assert all(p.requires_grad for p in trainer.model.img_encoder.parameters())


def test_together_with_init_from_is_refused(source, tmp_path):
    with pytest.raises(ConfigError, match=r"train.image_encoder_from: .*train.init_from .*already holds its image encoder"):
        _cfg("tiny", tmp_path / "run", "--train.init_from", str(source), "--train.image_encoder_from", str(source))


def test_a_source_without_a_vit_is_refused(source, tmp_path):
    no_vit = _edited_copy(source, tmp_path / "no-vit", lambda model: model.pop("vit"))
    cfg = _cfg("flamingo-tiny", tmp_path / "run", "--train.image_encoder_from", str(no_vit))
    with pytest.raises(ConfigError, match=r"train.image_encoder_from: expected a source whose model has a built-in ViT"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_tensors_that_do_not_fit_are_refused(source, tmp_path):
    def deeper(model: dict) -> None:
        model["vit"]["depth"] = 3  # the checkpoint holds 2 blocks

    bad = _edited_copy(source, tmp_path / "bad", deeper)
    cfg = _cfg("flamingo-tiny", tmp_path / "run", "--train.image_encoder_from", str(bad))
    with pytest.raises(ConfigError, match=r"train.image_encoder_from: .* does not fit .*missing \['blocks\.2\."):
        Trainer(cfg)


def test_another_image_size_is_refused_naming_both(source, tmp_path):
    cfg = _cfg("flamingo-tiny", tmp_path / "run", "--train.image_encoder_from", str(source), "--data.image_size", "64")
    with pytest.raises(ConfigError, match=r"data.image_size: .* takes 32px images .*got data.image_size=64"):
        Trainer(cfg)


def test_cli_missing_source_is_one_line_exit_2(tmp_path, capsys):
    code = main(["train", "--config", "flamingo-tiny", "--train.image_encoder_from", str(tmp_path / "nope"),
                 "--train.out_dir", str(tmp_path / "run"), "--train.progress", "false"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("mammut train: error: train.image_encoder_from: expected a run folder") and "\n" not in err

"""Checkpoints (mammut.models.pretrained on the format of mammut.io.checkpoint): exact round trips for every registered model,
clear errors for mismatched, truncated or corrupt checkpoints, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

from mammut.io.checkpoint import (  # noqa: E402
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    CheckpointError,
    read_checkpoint_config,
)
from mammut.models.pretrained import load_pretrained, save_pretrained  # noqa: E402
from mammut.models import get_model_spec, list_models  # noqa: E402
from mammut.models.mammut import MaMMUT, MaMMUTConfig  # noqa: E402

TINY_VIT = dict(image_size=16, patch_size=8, dim=32, depth=1, heads=2, dim_head=16)


def tiny_mammut(**overrides) -> MaMMUT:
    kw = dict(dim=32, num_tokens=64, depth=2, dim_head=16, heads=2, vit=dict(TINY_VIT))
    kw.update(overrides)
    return MaMMUT(**kw)


def tiny_model(name: str) -> torch.nn.Module:
    """A registered model from its registry spec's tiny config."""
    return get_model_spec(name).build_tiny()


def _registered() -> list[str]:
    return list_models()


def tie_structure(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for k, v in model.state_dict().items():
        groups.setdefault(v.data_ptr(), []).append(k)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert tie_structure(a) == tie_structure(b)


def json_config(model: torch.nn.Module) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(model.config)))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def saved(tmp_path) -> tuple[MaMMUT, Path]:
    model = tiny_mammut()
    path = model.save_pretrained(tmp_path / "ckpt")
    return model, path


# ---------------------------------------------------------------------------- round trips
def test_mammut_round_trip_exact(saved, no_network):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    doc = json.loads((path / CONFIG_NAME).read_text())
    assert doc["model_name"] == "mammut" and doc["format_version"] == FORMAT_VERSION
    assert doc["library_version"] and doc["config"]["dim"] == 32 and doc["external_modules"] == {}

    loaded = MaMMUT.from_pretrained(path)
    assert type(loaded) is MaMMUT and not loaded.training
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert loaded.to_logits.weight is loaded.token_emb.weight  # tie survives

    model.eval()
    text = torch.randint(1, 64, (3, 7))
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(text, images), loaded(text, images))
    for a, b in zip(model(text, images, return_embeddings=True), loaded(text, images, return_embeddings=True)):
        assert torch.equal(a, b)


def test_load_finds_class_from_config(saved):
    model, path = saved
    loaded = load_pretrained(path)
    assert type(loaded) is MaMMUT
    assert_same_state(model, loaded)


def test_config_tuples_and_options_round_trip(tmp_path):
    model = tiny_mammut(depth=3, cross_attend_layers=(1, 3), text_pool="cls", image_pool="attention", tie_embeddings=False)
    loaded = MaMMUT.from_pretrained(model.save_pretrained(tmp_path))
    assert loaded.config == model.config
    assert isinstance(loaded.config.cross_attend_layers, tuple)
    assert_same_state(model, loaded)


def test_dtype_kept_and_overridable(tmp_path):
    model = tiny_mammut().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = MaMMUT.from_pretrained(tmp_path)
    assert_same_state(model, loaded)
    as_fp32 = MaMMUT.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_fp32.token_emb.weight.dtype == torch.float32
    assert torch.equal(as_fp32.token_emb.weight.to(torch.bfloat16), model.token_emb.weight)


@pytest.mark.parametrize("name", _registered())
def test_every_registered_model_round_trips(name, tmp_path, no_network):
    model = tiny_model(name)
    path = model.save_pretrained(tmp_path / name)
    by_class = type(model).from_pretrained(path)
    by_name = load_pretrained(path)
    for loaded in (by_class, by_name):
        assert type(loaded) is type(model)
        assert json_config(loaded) == json_config(model)
        assert_same_state(model, loaded)


# ------------------------------------------------------------------------------- mismatch
def _edit_config(path: Path, **changes) -> None:
    doc = json.loads((path / CONFIG_NAME).read_text())
    doc["config"].update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(doc))


def test_shape_mismatch_names_the_tensor(saved):
    _, path = saved
    _edit_config(path, num_tokens=80)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(1\): \S+ \(tied with \S+\): checkpoint \(64, 32\) vs model \(80, 32\)"):
        MaMMUT.from_pretrained(path)


def test_missing_and_unexpected_tensors_named(saved):
    _, path = saved
    _edit_config(path, depth=3)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*layers\.2\.block"):
        MaMMUT.from_pretrained(path)
    _edit_config(path, depth=1)
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint.*layers\.1\.block"):
        MaMMUT.from_pretrained(path)


def test_non_strict_tolerates_missing_but_not_shapes(saved):
    model, path = saved
    _edit_config(path, depth=3)
    loaded = MaMMUT.from_pretrained(path, strict=False)
    assert len(loaded.layers) == 3
    state, ref = loaded.state_dict(), model.state_dict()
    for k in ref:  # everything the checkpoint has is loaded; layer 3 stays as initialised
        assert torch.equal(state[k], ref[k]), k
    _edit_config(path, depth=2, dim_head=8)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        MaMMUT.from_pretrained(path, strict=False)


def test_wrong_model_class_is_an_error(saved):
    _, path = saved

    class Other(MaMMUT):
        model_name = "other"

    with pytest.raises(CheckpointError, match="holds a 'mammut' model"):
        Other.from_pretrained(path)


def test_unknown_keyword_module_is_an_error(saved):
    _, path = saved
    with pytest.raises(TypeError, match="img_encoder"):
        MaMMUT.from_pretrained(path, img_encoder=torch.nn.Identity())


# ------------------------------------------------------------------------ corrupt / partial
def test_truncated_weights_file(saved):
    _, path = saved
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        MaMMUT.from_pretrained(path)
    # without the size record and the checksum, safetensors' own check still gives a clear error
    doc = json.loads((path / CONFIG_NAME).read_text())
    del doc["weights"]["num_bytes"]
    (path / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        MaMMUT.from_pretrained(path, verify=False)
    weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        MaMMUT.from_pretrained(path, verify=False)


def test_flipped_byte_fails_checksum(saved):
    _, path = saved
    weights = path / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        MaMMUT.from_pretrained(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "mammut", "format_', "not valid JSON"),
        ("\x00\xff garbage", "not valid JSON|corrupt"),
        ('["a list"]', "expected a mammut checkpoint config"),
    ],
)
def test_corrupt_config_json(saved, text, match):
    _, path = saved
    (path / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=match):
        MaMMUT.from_pretrained(path)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(dim="big"), r"config\.dim: expected an integer, got 'big'"),
        (dict(dim="32"), r"config\.dim: expected an integer, got '32'"),  # strict JSON: no command-line text
        (dict(dim_hed=16), r"config\.dim_hed: unknown key \(did you mean 'dim_head'\?\)"),
        (dict(cross_attend_layers="1,3"), r"config\.cross_attend_layers"),
        (dict(no_such_field=1), r"no_such_field"),
        (dict(contrastive_pass="sideways"), r"contrastive_pass"),
    ],
)
def test_invalid_config_values(saved, changes, match):
    _, path = saved
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        MaMMUT.from_pretrained(path)


def test_newer_format_and_missing_files(saved, tmp_path):
    _, path = saved
    doc = json.loads((path / CONFIG_NAME).read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    (path / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="newer mammut"):
        read_checkpoint_config(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_pretrained(tmp_path / "empty")


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import safetensors.torch

    def broken_save(module, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken_save)
    with torch.no_grad():
        model.token_emb.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no temp files, nothing replaced
    monkeypatch.undo()
    loaded = MaMMUT.from_pretrained(path)
    assert not torch.equal(loaded.token_emb.weight, model.token_emb.weight)


def test_save_rejects_non_models(tmp_path):
    with pytest.raises(TypeError, match="registered mammut model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    model = tiny_mammut()
    model.config = dataclasses.replace(model.config)
    model.config.vit = {"bad": object()}
    with pytest.raises(TypeError, match=r"config\.vit\.bad"):
        model.save_pretrained(tmp_path)


def test_config_class_only_round_trip(tmp_path):
    """MaMMUTConfig fields all survive JSON, including defaults."""
    model = MaMMUT(MaMMUTConfig(dim=16, num_tokens=32, depth=1, dim_head=8, heads=2))
    loaded = MaMMUT.from_pretrained(model.save_pretrained(tmp_path))
    assert loaded.config == model.config and loaded.img_encoder is None


# ------------------------------------------------------------------------ external modules
class PatchEncoder(torch.nn.Module):
    """A module the config cannot rebuild: images (b, 3, 16, 16) -> tokens (b, 4, 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 24, 8, stride=8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def _tiny_without_vit(name: str, img_encoder: torch.nn.Module, **extra) -> torch.nn.Module:
    """The spec's tiny model with an external encoder instead of its built-in ViT (every
    registered model takes ``img_encoder=``; the registry tests check its tiny config builds)."""
    spec = get_model_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    kw = {k: v for k, v in spec.tiny.items() if k != "vit"}
    kw.update({k: v for k, v in extra.items() if k in fields})
    return spec.cls(spec.config_class(**kw), img_encoder=img_encoder)


@pytest.mark.parametrize("name", _registered())
def test_external_encoder_with_spec_rebuilds_itself(name, tmp_path, no_network):
    from mammut.encoders import ViT

    model = _tiny_without_vit(name, ViT(**TINY_VIT))
    path = model.save_pretrained(tmp_path)
    doc = read_checkpoint_config(path)
    assert doc["external_modules"]["img_encoder"]["spec"]["type"] == "mammut.vit"
    loaded = load_pretrained(path)  # no img_encoder= needed
    assert_same_state(model, loaded)


@pytest.mark.parametrize("name", _registered())
def test_external_encoder_without_spec_must_be_passed(name, tmp_path):
    model = _tiny_without_vit(name, PatchEncoder(), image_dim=24)
    path = model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"img_encoder: this checkpoint was saved with an external img_encoder .*PatchEncoder.* pass img_encoder="):
        load_pretrained(path)
    fresh = PatchEncoder()
    loaded = load_pretrained(path, img_encoder=fresh)
    assert loaded.img_encoder is fresh
    assert_same_state(model, loaded)
    wrong = PatchEncoder()
    wrong.proj = torch.nn.Conv2d(3, 24, 4, stride=4)
    with pytest.raises(CheckpointError, match=r"img_encoder\.proj\.weight: checkpoint \(24, 3, 8, 8\) vs model \(24, 3, 4, 4\)"):
        load_pretrained(path, img_encoder=wrong)

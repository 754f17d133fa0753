"""The image encoder named in the model config (``encoder: {type: ...}``): the encoder registry
(``mammut.encoders.build_encoder`` / ``encoder_spec``), ``MaMMUT(encoder=...)`` with the video
encoder, checkpoints that rebuild a ``VideoTubeViT`` without ``img_encoder=``, run configs, and
``train.image_encoder_from`` into a video encoder's ViT."""

from __future__ import annotations

import json
import types

import pytest
import torch

import mammut
from mammut import CoCa, MaMMUT, VideoTubeConfig, VideoTubeViT, ViT
from mammut.encoders import build_encoder, encoder_spec, register_encoder, registered_encoders

VIT = dict(image_size=32, patch_size=8, dim=48, depth=1, heads=2, dim_head=16)
TUBES = [[[4, 8, 8], [4, 16, 16], [0, 0, 0]], [[8, 4, 4], [8, 16, 16], [0, 4, 4]]]
VIDEO = {"type": "video_tube", "vit": VIT, "frames": 8, "frame_stride": 4, "tubes": TUBES}
TEXT = dict(dim=32, num_tokens=50, depth=2, heads=2, dim_head=16, pad_id=0)


def _batch(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randint(1, 50, (b, 6))
    videos = torch.randn(b, 8, 3, 32, 32)  # (b, t, c, h, w): the library's video order
    return text, videos


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a.eval(), b.eval()
    text, videos = _batch()
    with torch.no_grad():
        torch.testing.assert_close(a(text, videos), b(text, videos))


def test_registry_types_and_specs_round_trip():
    assert {"vit", "mammut.vit", "video_tube", "timm", "transformers", "hf"} <= set(registered_encoders())
    enc = build_encoder(VIDEO)
    assert isinstance(enc, VideoTubeViT) and isinstance(enc.vit, ViT)
    assert enc.config.frames == 8 and enc.vit.config.dim == 48
    spec = json.loads(json.dumps(encoder_spec(enc)))  # JSON-able, as checkpoints store it
    assert spec["type"] == "video_tube" and spec["vit"]["dim"] == 48 and spec["frames"] == 8
    assert encoder_spec(build_encoder(spec)) == encoder_spec(enc)
    # ViT: string, {"type": "vit", fields...} and {"type": "mammut.vit", "config": {...}} agree
    vit_spec = encoder_spec(build_encoder("vit", **VIT))
    assert encoder_spec(build_encoder({"type": "vit", **VIT})) == vit_spec
    assert encoder_spec(build_encoder(vit_spec)) == vit_spec


def test_unknown_type_lists_the_registered_types():
    with pytest.raises(ValueError, match=r"unknown encoder type 'keras'.*video_tube"):
        build_encoder({"type": "keras"})
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("vit", lambda spec: torch.nn.Identity())


def test_mammut_with_a_video_encoder_trains_and_reloads_without_img_encoder(tmp_path):
    torch.manual_seed(0)
    model = MaMMUT(**TEXT, encoder=VIDEO)
    assert isinstance(model.img_encoder, VideoTubeViT) and model.image_dim == 48
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    param = next(model.img_encoder.vit.parameters())
    before = param.detach().clone()
    loss = model(*_batch(), return_loss=True)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = param
    assert not torch.equal(before, after)  # the encoder trains

    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["config"]["encoder"]["type"] == "video_tube" and saved["external_modules"] == {}
    loaded = mammut.load_pretrained(tmp_path / "m")
    assert isinstance(loaded.img_encoder, VideoTubeViT)
    _same_outputs(model, loaded)


def test_a_model_given_img_encoder_video_tube_reloads_without_it(tmp_path):
    torch.manual_seed(0)
    vit = ViT(**VIT)
    enc = VideoTubeViT(vit, VideoTubeConfig(frames=8, frame_stride=4, tubes=TUBES))
    model = MaMMUT(**TEXT, img_encoder=enc)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["external_modules"]["img_encoder"]["spec"]["type"] == "video_tube"
    loaded = MaMMUT.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.img_encoder, VideoTubeViT)
    _same_outputs(model, loaded)


def test_coca_takes_the_encoder_field_too():
    model = CoCa(dim=32, num_tokens=50, unimodal_depth=1, multimodal_depth=1, heads=2, dim_head=16, pad_id=0,
                 num_img_queries=4, encoder=VIDEO)
    assert isinstance(model.img_encoder, VideoTubeViT)
    text, videos = _batch()
    assert torch.isfinite(model(text, videos, return_loss=True))


def test_encoder_conflicts_name_both():
    with pytest.raises(ValueError, match="encoder and vit"):
        MaMMUT(**TEXT, encoder=VIDEO, vit=VIT)
    with pytest.raises(ValueError, match="encoder .*img_encoder="):
        MaMMUT(**TEXT, encoder=VIDEO, img_encoder=ViT(**VIT))


def test_a_run_config_model_section_builds_the_video_encoder():
    import yaml

    from mammut.train.build import build_model

    section = yaml.safe_load(yaml.safe_dump({"name": "mammut", **TEXT, "encoder": VIDEO}))  # as read from a YAML
    model = build_model(section)
    assert isinstance(model.img_encoder, VideoTubeViT) and model.img_encoder.config.tubes[0] == ((4, 8, 8), (4, 16, 16), (0, 0, 0))


def test_image_encoder_from_an_image_run_fills_the_video_encoders_vit(tmp_path):
    from mammut.train.loop import InitSource, _image_encoder_model_section

    torch.manual_seed(0)
    image_model = MaMMUT(**TEXT, vit=VIT)
    image_model.save_pretrained(tmp_path / "img")
    cfg = types.SimpleNamespace(model={"name": "mammut", **TEXT, "encoder": {**VIDEO, "vit": {"image_size": 32}}},
                                data=types.SimpleNamespace(image_size=32),
                                train=types.SimpleNamespace(image_encoder_from=str(tmp_path / "img")))
    section = _image_encoder_model_section(cfg, {"name": "mammut", **TEXT, "vit": VIT})
    assert section["encoder"]["vit"] == VIT and section["encoder"]["frames"] == 8 and "vit" not in section
    video_model = MaMMUT(**{k: v for k, v in section.items() if k != "name"})
    InitSource(section, tmp_path / "tok.json", tmp_path / "img" / "model.safetensors").load_image_encoder_into(video_model)
    want = image_model.img_encoder.state_dict()
    got = video_model.img_encoder.vit.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_a_run_config_fills_the_video_encoders_image_size_from_the_data():
    from types import SimpleNamespace

    from mammut.train.build import resolve_model_config
    from mammut.train.config import ConfigError, load_config

    tok = SimpleNamespace(vocab_size=100, pad_id=0, bos_id=1, eos_id=2, token_to_id=lambda t: None)
    encoder = "{type: video_tube, frames: 4, frame_stride: 2, vit: {patch_size: 8, dim: 32, depth: 1, heads: 2, dim_head: 16}}"
    cfg = load_config("tiny", ["--model.vit", "null", "--model.encoder", encoder])
    model = resolve_model_config(cfg, tok)
    assert model["encoder"]["vit"]["image_size"] == cfg.data.image_size and model.get("vit") is None
    bad = encoder.replace("patch_size: 8", "image_size: 64, patch_size: 8")
    with pytest.raises(ConfigError, match=r"model.encoder.vit.image_size: expected data.image_size=32, got 64"):
        resolve_model_config(load_config("tiny", ["--model.vit", "null", "--model.encoder", bad]), tok)

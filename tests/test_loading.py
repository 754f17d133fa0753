"""mammut.load: one call for model, preprocessing and tokenizer from every source (a tiny run,
our checkpoints, open_clip CoCa / openMaMMUT weights, Hub snapshots); the open_clip-style
tokenizer call and encode_image / encode_text; ImagePreprocess against open_clip's transform.
Everything is built here; nothing is downloaded."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mammut
from mammut import ImagePreprocess, MissingComponentError
from mammut.data.datasets import image_transform
from mammut.data.tokenizer import Tokenizer, train_bpe
from mammut.inference import embed_texts, load_run

CAPTIONS = ["a red disc", "a blue square left of a green star", "two cats"]


def photos() -> list[Image.Image]:
    """Odd sizes and modes: landscape RGB, portrait RGBA with transparency, grey, palette."""
    g = torch.Generator().manual_seed(0)
    rgb = Image.fromarray(torch.randint(0, 256, (45, 70, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")
    rgba = Image.fromarray(torch.randint(0, 256, (61, 38, 4), generator=g, dtype=torch.uint8).numpy(), "RGBA")
    return [rgb, rgba, rgb.convert("L"), rgb.convert("P")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from mammut.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    args = ["train", "--config", "tiny", "--train.out_dir", str(out), "--train.steps", "2", "--train.batch_size", "8",
            "--train.threads", "1", "--train.progress", "false", "--train.report", "false", "--train.save_every", "1",
            "--eval.n", "8", "--eval.max_new_tokens", "4"]
    assert main(args) == 0
    return out


# ----------------------------------------------------------------------------- runs
def test_a_run_folder_gives_its_model_eval_transform_and_tokenizer(run_dir):
    model, preprocess, tokenizer = mammut.load(run_dir)
    run = load_run(run_dir)
    assert not model.training and isinstance(model, mammut.MaMMUT)
    assert preprocess == ImagePreprocess(32) and tokenizer.context_length == run.config.data.max_len == 16
    reference = image_transform(32, train=False, normalize=False)  # the data code's eval transform: same pixels
    for im in photos():
        torch.testing.assert_close(preprocess(im), reference(im), rtol=0, atol=0)
    ids = tokenizer(CAPTIONS)
    torch.testing.assert_close(ids, run.tokenizer.encode(CAPTIONS, 16, truncate=True))  # as training encodes
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, normalize=True),
                                   embed_texts(run.model, run.tokenizer, CAPTIONS, 16, truncate=True))
    # checkpoint= picks an older step, by name under checkpoints/ or by path
    old = mammut.load(run_dir, checkpoint="step_00000001").model
    assert not torch.equal(old.token_emb.weight, model.token_emb.weight)
    torch.testing.assert_close(old.token_emb.weight, load_run(run_dir, run_dir / "checkpoints/step_00000001").model.token_emb.weight)
    with pytest.raises(FileNotFoundError, match="checkpoint: no checkpoint 'step_9'"):
        mammut.load(run_dir, checkpoint="step_9")


def test_save_pretrained_with_preprocess_and_tokenizer_round_trips(run_dir, tmp_path):
    model, preprocess, tokenizer = mammut.load(run_dir)
    folder = mammut.save_pretrained(model, tmp_path / "ck", preprocess=preprocess, tokenizer=tokenizer)
    assert {"preprocess.json", "mammut_tokenizer.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model2, preprocess2, tokenizer2 = mammut.load(folder, dtype=torch.float64)
    assert preprocess2 == preprocess and tokenizer2.context_length == 16
    ids = tokenizer2(CAPTIONS + ["word " * 40])
    torch.testing.assert_close(ids, tokenizer(CAPTIONS + ["word " * 40]))
    images = torch.stack([preprocess(im) for im in photos()])  # float32 pixels into a float64 model
    with torch.no_grad():
        assert model2.encode_image(images).dtype == torch.float64
        torch.testing.assert_close(model2.encode_image(images).float(), model.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model2.encode_text(ids).float(), model.encode_text(ids), atol=1e-5, rtol=1e-5)
    assert ImagePreprocess.load(folder / "preprocess.json") == preprocess


def test_missing_parts_load_the_model_and_explain_themselves(run_dir, tmp_path):
    model, preprocess, tokenizer = mammut.load(run_dir)
    folder = tmp_path / "ck"
    model.save_pretrained(folder, preprocess=preprocess, tokenizer=tokenizer)
    model.save_pretrained(folder)  # saved again without them: the stale files must not be picked up
    model2, preprocess2, tokenizer2 = mammut.load(folder)
    assert isinstance(model2, mammut.MaMMUT) and not preprocess2 and not tokenizer2
    with pytest.raises(MissingComponentError, match=r"tokenizer: .*saved without its tokenizer.*tokenizer=\.\.\."):
        tokenizer2(["a red disc"])
    with pytest.raises(MissingComponentError, match="preprocess: .*preprocess.json"):
        preprocess2(photos()[0])
    # a folder exported before companions were recorded: a bare tokenizer.json is its tokenizer
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    for name in ("mammut_tokenizer.json", "preprocess.json", "tokenizer.json"):
        (legacy / name).unlink()
    document = json.loads((legacy / "config.json").read_text())
    del document["companions"]
    (legacy / "config.json").write_text(json.dumps(document))
    tokenizer.save(legacy / "tokenizer.json")
    _, _, tok = mammut.load(legacy)
    assert tok.context_length is None
    torch.testing.assert_close(tok(CAPTIONS, 16), tokenizer(CAPTIONS))
    assert tokenizer(CAPTIONS)[1, -1] == tokenizer.eos_id  # the long caption was cut, its end token kept
    with pytest.raises(ValueError, match="context_length: expected an int"):
        tok(CAPTIONS)


def test_bad_sources_and_arguments_are_named(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="source: no such file or folder .*hf-hub:org/name"):
        mammut.load("laion/nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="none of the folders mammut.load reads"):
        mammut.load(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="open_clip weights file"):
        mammut.load(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="dtype: expected None or a floating torch.dtype, got torch.int64"):
        mammut.load(run_dir, dtype=torch.int64)
    model, preprocess, tokenizer = mammut.load(run_dir)
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="checkpoint: only a training run folder"):
        mammut.load(tmp_path / "ck", checkpoint="step_00000001")
    with pytest.raises(TypeError, match="tokenizer: expected a mammut.data.tokenizer.Tokenizer"):
        model.save_pretrained(tmp_path / "bad", tokenizer=lambda texts: texts)
    assert not (tmp_path / "bad").exists()  # nothing written


# ----------------------------------------------------------------------------- model API
def test_encode_is_open_clips_and_set_image_size_round_trips(run_dir, tmp_path):
    model, preprocess, tokenizer = mammut.load(run_dir)
    images = torch.stack([preprocess(im) for im in photos()])
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        raw_i, raw_t = model.encode_image(images), model.encode_text(ids)
        assert not torch.allclose(raw_i.norm(dim=-1), torch.ones(len(images)))  # not normalised by default
        torch.testing.assert_close(F.normalize(raw_i, dim=-1), model.encode_image(images, normalize=True))
        torch.testing.assert_close(model.embed_image(images), model.encode_image(images, normalize=True))
        torch.testing.assert_close(F.normalize(raw_t, dim=-1), model.embed_text(ids))
    model.set_image_size(48)
    assert model.image_size == 48 and model.config.vit["image_size"] == 48
    assert mammut.models.get_model_spec("mammut").tiny["vit"]["image_size"] == 32  # shared presets untouched
    model.save_pretrained(tmp_path / "ck", preprocess=preprocess, tokenizer=tokenizer)  # preprocess still at 32
    model2, preprocess2, _ = mammut.load(tmp_path / "ck")
    assert model2.image_size == 48 and preprocess2 == preprocess.with_image_size(48)  # follows the model
    big = torch.stack([preprocess2(im) for im in photos()])
    with torch.no_grad():
        torch.testing.assert_close(model2.encode_image(big), model.encode_image(big))


# ----------------------------------------------------------------------------- tokenizers
def test_tokenizer_call_is_open_clips():
    tok = train_bpe(CAPTIONS * 20, vocab_size=300)
    with pytest.raises(ValueError, match="context_length: expected an int .*got None"):
        tok("a red disc")
    tok = Tokenizer(tok.hf, context_length=8)
    one = tok("a red disc")
    assert one.shape == (1, 8) and one.dtype == torch.long
    torch.testing.assert_close(one, tok.encode(["a red disc"], 8))
    long = tok(["word " * 30, "a red disc"])
    assert long.shape == (2, 8) and long[0, 0] == tok.bos_id and long[0, -1] == tok.eos_id and (long[0] != tok.pad_id).all()
    assert tok.decode(long)[1] == "a red disc" and tok(["a red disc"], 12).shape == (1, 12)
    with pytest.raises(ValueError, match="truncate"):
        tok.encode(["word " * 30], 8)  # encode keeps its strict contract
    with pytest.raises(ValueError, match="truncate"):
        tok(["word " * 30], truncate=False)
    with pytest.raises(ValueError, match="context_length: expected an int >= 3"):
        tok("a", 2)


def test_clip_tokenizer_call_truncates_as_open_clip():
    open_clip = pytest.importorskip("open_clip")
    from mammut.convert.clip_tokenizer import CLIPTokenizer

    texts = ["a photo of a cat", "word " * 100]
    for length in (76, 77):
        ours, theirs = CLIPTokenizer(context_length=length), open_clip.tokenize if length == 77 else open_clip.get_tokenizer("coca_ViT-B-32")
        torch.testing.assert_close(ours(texts), theirs(texts))
        torch.testing.assert_close(ours("a photo of a cat"), theirs(["a photo of a cat"]))
    assert CLIPTokenizer()(texts, context_length=20).shape == (2, 20)


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("cfg", [
    {}, {"resize_mode": "squash", "interpolation": "bilinear"},
    {"resize_mode": "longest", "fill_color": 7, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]},
], ids=["shortest", "squash", "longest"])
def test_open_clip_preprocess_gives_open_clips_pixels(cfg):
    pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    ours = ImagePreprocess.open_clip(40, cfg)
    theirs = image_transform_v2(PreprocessCfg(**{"size": 40, **cfg}), is_train=False)
    for im in photos():
        torch.testing.assert_close(ours(im), theirs(im), rtol=0, atol=0)
    assert ImagePreprocess.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


def test_preprocess_settings_are_checked():
    with pytest.raises(ValueError, match="image_size: expected an int >= 1, got 0"):
        ImagePreprocess(0)
    with pytest.raises(ValueError, match="mean / std: expected both or neither"):
        ImagePreprocess(8, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="std: expected 3 finite numbers > 0"):
        ImagePreprocess(8, mean=(0.5,) * 3, std=(0.5, 0.0, 1.0))
    with pytest.raises(ValueError, match="resize_mode: expected one of"):
        ImagePreprocess(8, resize_mode="crop")
    with pytest.raises(ValueError, match=r"preprocess.json: unknown keys \['size'\]"):
        ImagePreprocess.from_dict({"image_size": 8, "size": 8}, where="preprocess.json")
    with pytest.raises(TypeError, match="image: expected a PIL image, got Tensor"):
        ImagePreprocess(8)(torch.zeros(3, 8, 8))


# ----------------------------------------------------------------------------- open_clip sources
def tiny_coca_config() -> dict:
    """An open_clip CoCa config in coca_ViT-B-32's schema, small enough for the CPU."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16,
                       "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 9, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1, "embed_cls": True,
                     "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 4},
        "custom_text": True,
    }


def open_clip_coca(cfg: dict) -> torch.nn.Module:
    """open_clip's own CoCa with every parameter moved off its init (open_clip 3.3 leaves the
    decoder's vocabulary projection as torch.empty)."""
    from open_clip.coca_model import CoCa

    torch.manual_seed(0)
    model = CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 64 else 0.0))
    return model.eval()


def assert_same_embeddings(theirs, model, preprocess, tokenizer, their_preprocess, their_tokenizer):
    images_ours = torch.stack([preprocess(im) for im in photos()])
    images_theirs = torch.stack([their_preprocess(im) for im in photos()])
    torch.testing.assert_close(images_ours, images_theirs, rtol=0, atol=0)
    torch.testing.assert_close(tokenizer(CAPTIONS), their_tokenizer(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images_ours), theirs.encode_image(images_theirs, normalize=False), atol=1e-4, rtol=1e-4)
        ids = tokenizer(CAPTIONS)
        torch.testing.assert_close(model.encode_text(ids), theirs.encode_text(ids, normalize=False), atol=1e-4, rtol=1e-4)


def test_an_open_clip_hub_snapshot_loads_as_open_clip_reads_it(tmp_path, monkeypatch):
    """A local Hub snapshot (open_clip_config.json + open_clip_pytorch_model.bin): against open_clip's
    own create_model_and_transforms('local-dir:...') and get_tokenizer; then the same folder as
    hf-hub:org/name from a Hugging Face cache, and a name that is not cached."""
    open_clip = pytest.importorskip("open_clip")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cfg = tiny_coca_config()
    theirs = open_clip_coca(cfg)
    snap = tmp_path / "hub" / "models--org--tiny-coca" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    preprocess_cfg = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear", "resize_mode": "squash"}
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}))
    torch.save(theirs.state_dict(), snap / "open_clip_pytorch_model.bin")

    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(f"local-dir:{snap}")
    ref_tokenizer = open_clip.get_tokenizer(f"local-dir:{snap}")
    model, preprocess, tokenizer = mammut.load(snap)
    assert isinstance(model, mammut.CoCa) and tokenizer.context_length == 76
    assert preprocess == ImagePreprocess(64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), interpolation="bilinear",
                                         resize_mode="squash", background=None)
    assert_same_embeddings(ref_model.eval(), model, preprocess, tokenizer, ref_preprocess, ref_tokenizer)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model2, preprocess2, _ = mammut.load("hf-hub:org/tiny-coca", dtype=torch.float64)
    assert preprocess2 == preprocess and model2.token_emb.weight.dtype == torch.float64
    with pytest.raises(FileNotFoundError, match=r"hf-hub:org/absent is not in the local Hugging Face cache.*huggingface-cli download org/absent"):
        mammut.load("hf-hub:org/absent")
    # huggingface_hub 0.20-0.24 has no huggingface_hub.errors module: the error class comes from .utils
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", None)
    with pytest.raises(FileNotFoundError, match=r"hf-hub:org/absent is not in the local Hugging Face cache"):
        mammut.load("hf-hub:org/absent")


def test_an_open_clip_coca_file_is_recognised_by_its_shapes(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.coca_model import CoCa

    import mammut.convert.open_clip as oc
    from mammut.loading import detect_open_clip_architecture

    # the published architectures, from shapes alone (meta tensors: no memory, no init)
    for name in oc.OPEN_CLIP_COCA_MODELS:
        with torch.device("meta"):
            sd = CoCa(**{k: v for k, v in oc.open_clip_model_config(name).items() if k != "custom_text"}).state_dict()
        assert detect_open_clip_architecture(sd)[0] == name
    # a file of a config mammut does not know: named, with what its shapes say
    cfg = tiny_coca_config()
    theirs = open_clip_coca(cfg)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "coca.safetensors")
    with pytest.raises(ValueError, match=r"no known open_clip CoCa config fits; its shapes say \{'vision_width': 64.*coca_ViT-B-32"):
        mammut.load(tmp_path / "coca.safetensors")
    # once known, it loads: open_clip's preprocessing and tokenizer at the model's sizes
    known = {"coca_tiny": cfg}
    monkeypatch.setattr(oc, "OPEN_CLIP_COCA_MODELS", tuple(known))
    monkeypatch.setattr(oc, "open_clip_model_config", lambda name: json.loads(json.dumps(known[name])))
    model, preprocess, tokenizer = mammut.load(tmp_path / "coca.safetensors")
    assert preprocess == ImagePreprocess.open_clip(64)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    assert_same_embeddings(theirs, model, preprocess, tokenizer, image_transform_v2(PreprocessCfg(size=64), is_train=False),
                           open_clip.get_tokenizer("coca_ViT-B-32"))


def fork_state_dict(cfg: dict, device: str = "cpu", image_size: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as an openMaMMUT state dict of LAION's fork for ``cfg`` (its JSON
    schema), random values: the layout only (test_open_mammut checks the numbers)."""
    g = torch.Generator().manual_seed(0)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vw, tw, p = v["width"], t["width"], v["patch_size"]
    grid = (image_size or v.get("image_size", 224)) // p
    shapes: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, w: int, mlp: bool = True, cross: bool = False) -> None:
        for norm in ("ln_1",) + (("ln_1_kv",) if cross else ()) + (("ln_2",) if mlp else ()):
            shapes.update({f"{prefix}.{norm}.weight": (w,), f"{prefix}.{norm}.bias": (w,)})
        shapes.update({f"{prefix}.attn.in_proj_weight": (3 * w, w), f"{prefix}.attn.in_proj_bias": (3 * w,),
                       f"{prefix}.attn.out_proj.weight": (w, w), f"{prefix}.attn.out_proj.bias": (w,)})
        if mlp:
            shapes.update({f"{prefix}.mlp.c_fc.weight": (4 * w, w), f"{prefix}.mlp.c_fc.bias": (4 * w,),
                           f"{prefix}.mlp.c_proj.weight": (w, 4 * w), f"{prefix}.mlp.c_proj.bias": (w,)})

    shapes.update({"visual.conv1.weight": (vw, 3, p, p), "visual.class_embedding": (vw,),
                   "visual.positional_embedding": (grid * grid + 1, vw), "visual.proj": (vw, cfg["embed_dim"])})
    for norm in ("visual.ln_pre", "visual.ln_post", "text.ln_final"):
        w = tw if norm.startswith("text") else vw
        shapes.update({f"{norm}.weight": (w,), f"{norm}.bias": (w,)})
    for i in range(v["layers"]):
        block(f"visual.transformer.resblocks.{i}", vw)
    layers = t["layers"]
    step = layers // (layers // t["cross_attn_ratio"])
    for i in range(layers):
        block(f"text.resblocks.{i}", tw, mlp=t.get("has_mlp", True) or i % step != 0)
    for j in range(layers // t["cross_attn_ratio"]):
        block(f"text.cross_attn.{j}", tw, cross=True)
    shapes.update({"text.token_embedding.weight": (t["vocab_size"], tw), "text.positional_embedding": (t["context_length"], tw),
                   "text.text_projection": (tw, t["vocab_size"]), "map_viz2txt_kv": (vw, tw), "logit_scale": ()})
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: torch.randn(s, generator=g) * 0.05 + (1.0 if k.endswith("ln_1.weight") else 0.0) for k, s in shapes.items()}


def test_an_openmammut_file_is_recognised_by_its_shapes(tmp_path, monkeypatch, caplog):
    pytest.importorskip("open_clip")
    import mammut.convert.open_mammut as om
    from mammut.loading import detect_open_clip_architecture

    for name, cfg in om.OPEN_MAMMUT_CONFIGS.items():  # every fork config, from shapes alone
        assert detect_open_clip_architecture(fork_state_dict(cfg, "meta")) == (name, cfg)
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                                           "output_tokens": True, "pool_type": "avg_all", "final_ln_after_pool": True},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                        "output_tokens": True, "cross_attn_ratio": 2, "does_full_decoding": True, "has_mlp": False},
           "custom_text": True}
    sd = fork_state_dict(cfg, image_size=48)  # a fine-tune at 48 px of a 32 px config
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "epoch_3.pt")
    with pytest.raises(ValueError, match="no known openMaMMUT config fits.*mammut_ViT-L-14"):
        mammut.load(tmp_path / "epoch_3.pt")
    monkeypatch.setitem(om.OPEN_MAMMUT_CONFIGS, "mammut_tiny", cfg)
    with caplog.at_level(logging.WARNING, logger="mammut.loading"):
        model, preprocess, tokenizer = mammut.load(tmp_path / "epoch_3.pt", dtype=torch.float64)
    # shapes cannot show head counts: the assumed config and its heads are named, with the way round it
    assert any(r.levelno == logging.WARNING and "assumed the mammut_tiny config" in r.getMessage()
               and "vision 2 heads (head width 32), text 2 heads" in r.getMessage()
               and "mammut.MaMMUT.from_open_clip(config_dict, path)" in r.getMessage() for r in caplog.records)
    assert isinstance(model, mammut.MaMMUT) and model.image_size == 48 and model.token_emb.weight.dtype == torch.float64
    assert preprocess == ImagePreprocess.open_clip(48) and tokenizer.context_length == 77
    reference = om.mammut_from_open_clip({**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": 48}}, sd, dtype=torch.float64)
    images, ids = torch.stack([preprocess(im) for im in photos()]), tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.embed_image(images.double(), normalize=False))
        torch.testing.assert_close(model.encode_text(ids), reference.embed_text(ids, normalize=False))
    # neither a CoCa nor an openMaMMUT: named
    torch.save({k: v for k, v in sd.items() if k != "map_viz2txt_kv"}, tmp_path / "clip.bin")
    with pytest.raises(ValueError, match=r"clip.bin: not an open_clip CoCa \(text_decoder.\* tensors\) or openMaMMUT"):
        mammut.load(tmp_path / "clip.bin")

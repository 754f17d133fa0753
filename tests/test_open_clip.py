"""open_clip CoCa import: exact parity with open_clip's own model (random weights; nothing is
downloaded) and its tokenizer."""

import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mammut.convert.clip_tokenizer import CLIPTokenizer  # noqa: E402
from mammut.convert.open_clip import (  # noqa: E402
    coca_config_from_open_clip,
    coca_from_open_clip,
    convert_open_clip_coca_state_dict,
    open_clip_model_config,
)
from mammut.models.coca import CoCa  # noqa: E402

CAPTIONS = ["a photo of a cat sitting on a red sofa", "two dogs"]
ATOL = 1e-4


def perturb_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """open_clip 3.3.0 leaves the decoder's vocabulary projection uninitialised (torch.empty):
    initialise it. Random init leaves LayerNorm weights at 1 and biases at 0: move every
    parameter so a mix-up of any two tensors shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        proj = model.text_decoder.text_projection
        proj.copy_(torch.randn(proj.shape, generator=g) * proj.shape[0] ** -0.5)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def small_config(name: str, layers: int = 1, vocab: int = 1000) -> dict:
    cfg = copy.deepcopy(open_clip_model_config(name))
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        cfg[tower]["layers"] = layers
    cfg["text_cfg"]["vocab_size"] = cfg["multimodal_cfg"]["vocab_size"] = vocab
    return cfg


def random_text(vocab: int, lengths=(9, 76), width: int = 76) -> torch.Tensor:
    """Right-padded ids (pad 0) for a model with a reduced vocabulary."""
    text = torch.randint(1, vocab, (len(lengths), width))
    for row, n in enumerate(lengths):
        text[row, n:] = 0
    return text


def build_open_clip(cfg: dict) -> torch.nn.Module:
    from open_clip.coca_model import CoCa as OpenClipCoCa

    return perturb_(OpenClipCoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}))


def assert_parity(theirs, ours, images, text):
    with torch.no_grad():
        out = theirs(images, text)  # logits for text[:, :-1], as open_clip trains
        text_emb, image_emb = ours(text, images, return_embeddings=True)
        torch.testing.assert_close(image_emb, out["image_features"], atol=ATOL, rtol=0)
        torch.testing.assert_close(text_emb, out["text_features"], atol=ATOL, rtol=0)
        logits = ours(text, images)
        torch.testing.assert_close(logits[:, :-1], out["logits"], atol=ATOL, rtol=0)
        # the decoder protocol (what generation runs) agrees at every real token
        real = text[:, :-1] != 0
        decoded = ours.decode(text[:, :-1], ours.image_context(images))
        torch.testing.assert_close(decoded[real], out["logits"][real], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def b32():
    """open_clip's coca_ViT-B-32 at full size, random weights, and its conversion."""
    torch.manual_seed(0)
    theirs = perturb_(open_clip.create_model("coca_ViT-B-32", pretrained=None))
    ours = CoCa.from_open_clip("coca_ViT-B-32", theirs.state_dict())
    return theirs, ours


def test_config_comes_from_the_installed_open_clip():
    raw = open_clip_model_config("coca_ViT-B-32")
    assert raw == open_clip.get_model_config("coca_ViT-B-32")
    cfg = coca_config_from_open_clip(raw)
    assert (cfg.dim, cfg.image_dim, cfg.num_tokens, cfg.unimodal_depth, cfg.multimodal_depth) == (512, 768, 49408, 12, 12)
    assert (cfg.num_img_queries, cfg.max_text_len, cfg.pad_id, cfg.bos_id, cfg.eos_id) == (255, 76, 0, 49406, 49407)
    assert cfg.vit["patch_size"] == 32 and cfg.vit["depth"] == 12 and cfg.vit["class_token"]
    l14 = coca_config_from_open_clip(open_clip_model_config("coca_ViT-L-14"))
    assert (l14.dim, l14.image_dim, l14.heads, l14.pool_heads, l14.pool_dim_head) == (768, 1024, 12, 8, 96)


def test_b32_full_size_embeddings_and_logits_match(b32):
    theirs, ours = b32
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    images = torch.randn(2, 3, 224, 224)
    text = CLIPTokenizer()(CAPTIONS)  # (2, 76), right-padded with 0
    assert_parity(theirs, ours, images, text)


def test_b32_greedy_captions_match_open_clip_generate(b32):
    pytest.importorskip("transformers")
    theirs, ours = b32
    images = torch.randn(3, 3, 224, 224)
    seq_len, eot = 12, 49407

    def both(max_new):
        with torch.no_grad():
            ref = theirs.generate(images, generation_type="top_k", top_k=1, seq_len=seq_len)
        # open_clip: start token, eos banned while the sequence is shorter than 5 tokens, eos
        # forced as token seq_len, pad after eos; ours: new tokens only, pad after eos
        new = ours.generate(images, max_new_tokens=max_new, min_new_tokens=4)
        assert bool((ref[:, 0] == 49406).all())
        width = seq_len - 2  # leave out open_clip's forced last token
        pad = lambda t: torch.nn.functional.pad(t, (0, seq_len - t.shape[1]))[:, :width]  # noqa: E731
        return pad(ref[:, 1:]), pad(new)

    ref, new = both(seq_len - 1)
    torch.testing.assert_close(new, ref, rtol=0, atol=0)
    # now make eos win wherever the token greedy picked 6th in row 0 would: rows end early
    token = int(ref[0, 5])
    proj_theirs, proj_ours = theirs.text_decoder.text_projection, ours.to_logits.weight
    saved = proj_theirs[:, eot].clone(), proj_ours[eot].clone()
    try:
        with torch.no_grad():
            proj_theirs[:, eot] = proj_theirs[:, token] * 1.05
            proj_ours[eot] = proj_ours[token] * 1.05
        ref, new = both(seq_len - 1)
        torch.testing.assert_close(new, ref, rtol=0, atol=0)
        assert bool((ref[0, :6] == eot).any())  # row 0 ends by its 6th token, with pad after
        end = int((ref[0] == eot).nonzero()[0])
        assert bool((ref[0, end + 1 :] == 0).all())
    finally:
        with torch.no_grad():
            proj_theirs[:, eot], proj_ours[eot] = saved


def test_l14_layout_matches_at_reduced_depth():
    cfg = small_config("coca_ViT-L-14")
    theirs = build_open_clip(cfg)
    ours = CoCa.from_open_clip(cfg, theirs)
    images = torch.randn(2, 3, 224, 224)
    assert_parity(theirs, ours, images, random_text(1000))


def test_checkpoint_files_and_quickgelu(tmp_path):
    from safetensors.torch import save_file

    cfg = small_config("coca_ViT-B-32")
    cfg["quick_gelu"] = True
    theirs = build_open_clip(cfg)
    sd = theirs.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    images = torch.randn(1, 3, 224, 224)
    text = random_text(1000, lengths=(5,))
    for source in (tmp_path / "w.pt", str(tmp_path / "w.safetensors")):
        ours = coca_from_open_clip(cfg, source)
        assert ours.config.activation == "quickgelu" and ours.config.vit["activation"] == "quickgelu"
        assert_parity(theirs, ours, images, text)


def test_clear_errors():
    cfg = small_config("coca_ViT-B-32")
    sd = build_open_clip(cfg).state_dict()
    config = coca_config_from_open_clip(cfg)
    with pytest.raises(ValueError, match="model_name"):
        open_clip_model_config("ViT-B-32-nope")
    with pytest.raises(ValueError, match="missing"):
        convert_open_clip_coca_state_dict({k: v for k, v in sd.items() if "ln_post" not in k}, config)
    with pytest.raises(ValueError, match="no place"):
        convert_open_clip_coca_state_dict({**sd, "visual.extra": torch.zeros(1)}, config)
    with pytest.raises(TypeError, match="state_dict_or_path"):
        coca_from_open_clip(cfg, 3)
    with pytest.raises(FileNotFoundError):
        coca_from_open_clip(cfg, "/nonexistent/weights.pt")
    for tower, key, value in [("vision_cfg", "attentional_pool", "parallel"), ("text_cfg", "hf_model_name", "roberta-base"),
                              ("vision_cfg", "ls_init_value", 1e-5)]:
        bad = copy.deepcopy(cfg)
        bad[tower][key] = value
        with pytest.raises(ValueError, match=key):
            coca_config_from_open_clip(bad)


def test_tokenizer_matches_open_clip():
    tok = CLIPTokenizer()
    ref = open_clip.get_tokenizer("coca_ViT-B-32")(CAPTIONS)
    ids = tok(CAPTIONS)
    assert ids.shape == ref.shape == (2, 76)
    torch.testing.assert_close(ids, ref)
    assert tok.decode(ids) == CAPTIONS
    assert (tok.bos_id, tok.eos_id, tok.pad_id, len(tok)) == (49406, 49407, 0, 49408)
    assert tok.bpe_path.name == "bpe_simple_vocab_16e6.txt.gz" and tok.bpe_path.is_file()
    with pytest.raises(ValueError, match="truncate"):
        tok(["word " * 100], truncate=False)
    assert tok(["word " * 100])[0, -1] == tok.eos_id  # open_clip's call: cut, end token kept


def test_from_open_clip_is_looked_up_in_the_converter_registry():
    """Model.from_open_clip is ModelBase's, and finds the converter registered for the model's
    registry name in mammut.convert; a model without one says which models have one."""
    import mammut.convert as convert
    from mammut import MaMMUT

    assert "from_open_clip" not in vars(CoCa) and convert.open_clip_converter("coca") is coca_from_open_clip
    cfg = small_config("coca_ViT-B-32")
    theirs = build_open_clip(cfg)
    assert CoCa.from_open_clip(cfg, theirs, dtype=torch.float64).to_logits.weight.dtype == torch.float64
    assert convert.open_clip_converter("mammut") is convert.mammut_from_open_clip
    with pytest.raises(ValueError, match="multimodal_cfg"):  # a CoCa config is not an openMaMMUT one
        MaMMUT.from_open_clip(cfg, theirs)
    from mammut import FlamingoPaLM

    with pytest.raises(ValueError, match=r"expected a model with an open_clip converter \(coca, mammut\), got 'flamingo"):
        FlamingoPaLM.from_open_clip(cfg, theirs)


def test_models_never_import_the_converters():
    """One-way dependency: mammut.convert imports mammut.models; no import statement under
    mammut.models names mammut.convert (ModelBase looks it up with importlib at call time)."""
    import ast
    from pathlib import Path

    import mammut.models

    def imported(path: Path, package: str) -> set[str]:
        out = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                out.add(".".join(base + ([node.module] if node.module else [])))
                out |= {f"{'.'.join(base + ([node.module] if node.module else []))}.{a.name}" for a in node.names}
        return out

    models_dir = Path(mammut.models.__file__).parent
    for path in models_dir.glob("*.py"):
        names = imported(path, "mammut.models")
        assert not {n for n in names if n == "mammut.convert" or n.startswith("mammut.convert.")}, path.name
    convert_dir = models_dir.parent / "convert"
    assert "mammut.models.coca" in imported(convert_dir / "open_clip.py", "mammut.convert")

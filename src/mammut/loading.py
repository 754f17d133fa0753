"""One call for inference, as open_clip's ``create_model_and_transforms`` + ``get_tokenizer``:
:func:`load` -> ``(model, preprocess, tokenizer)`` from any source mammut reads.

Sources (nothing is downloaded, ever):

- a mammut checkpoint folder (``config.json`` + ``model.safetensors``, written by
  ``save_pretrained``; with ``preprocess.json`` / ``mammut_tokenizer.json`` when it was saved
  with ``preprocess=`` / ``tokenizer=``, :mod:`mammut.models.companions`);
- a training run folder (``config.yaml`` + ``checkpoints/``, read by :mod:`mammut.runs`
  without the training stack): its exported ``model/`` (``save_pretrained`` at the end of
  training) when that is at least as new as its newest checkpoint that verifies, else that
  checkpoint, or ``checkpoint=`` (a path, or a name under ``checkpoints/``); the run's eval
  transform and tokenizer (context length ``data.max_len``);
- an open_clip checkpoint file (``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``, read with
  ``weights_only=True``: a pickle holding other Python objects is refused with
  :class:`mammut.io.checkpoint.UnsafePickleError`, never unpickled): an open_clip CoCa
  (``text_decoder.*`` keys) or an openMaMMUT of LAION's fork (the ``map_viz2txt_kv`` key).
  The architecture is the known config (``mammut.convert.OPEN_CLIP_COCA_MODELS`` read from the
  installed open_clip, ``mammut.convert.OPEN_MAMMUT_CONFIGS``) whose shapes the weights have: widths, depths,
  patch size, vocabulary and embedding size are read from tensor shapes and compared; the
  head counts, which no shape shows, come from the matching config; the image size is read
  from the positional grid (a fine-tune at another resolution loads under its base config).
  No match, or several, is an error naming what was read;
- a local snapshot of a Hugging Face Hub repository of an open_clip model
  (``open_clip_config.json`` with ``model_cfg`` + ``preprocess_cfg``, weights
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``; without the config its
  weights file is read as above), or of a mammut checkpoint pushed to the Hub;
- ``"hf-hub:org/name"``: that repository's snapshot in the local Hugging Face cache only
  (``local_files_only=True``); when it is not cached the error says how to get it.

open_clip sources get open_clip's eval preprocessing (OpenAI CLIP mean/std, bicubic, short
side + centre crop at the model's image size, ``preprocess_cfg`` overriding) and its CLIP BPE
tokenizer at the model's context length (76 for CoCa, 77 for openMaMMUT).

A mammut checkpoint saved without its preprocessing or tokenizer still loads: the missing part
is a :class:`MissingComponent` (false in ``if``), whose use raises :class:`MissingComponentError`
saying what is missing and how to save it. The preprocessing always follows the model's image
size (``model.image_size``).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .models.contract import ImageSized
from .preprocess import ImagePreprocess

__all__ = ["load", "Loaded", "MissingComponent", "MissingComponentError", "detect_open_clip_architecture"]

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class MissingComponentError(LookupError):
    """A part :func:`load` could not find (a checkpoint saved without its tokenizer, say)."""


class MissingComponent:
    """Stands for a preprocessing or tokenizer a source does not have: false in ``if``; calling it
    (or ``decode``) raises :class:`MissingComponentError` with the reason and the fix."""

    def __init__(self, what: str, reason: str) -> None:
        self.what, self.reason = what, reason

    def __bool__(self) -> bool:
        return False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise MissingComponentError(f"{self.what}: {self.reason}")

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        raise MissingComponentError(f"{self.what}: {self.reason}")

    def __repr__(self) -> str:
        return f"MissingComponent({self.what!r})"


class Loaded(NamedTuple):
    """What :func:`load` returns; unpacks as ``model, preprocess, tokenizer``."""

    model: nn.Module
    preprocess: ImagePreprocess | MissingComponent
    tokenizer: Any


def load(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    checkpoint: str | Path | None = None,
) -> Loaded:
    """``model, preprocess, tokenizer`` from a mammut checkpoint folder, a training run folder,
    an open_clip CoCa / openMaMMUT checkpoint file, a local Hugging Face snapshot folder, or
    ``"hf-hub:org/name"`` from the local Hugging Face cache (see :mod:`mammut.loading`).

    - ``model``: in eval mode, on ``device`` (default CPU), in ``dtype`` (default: as stored);
      ``model.encode_image(images)`` / ``model.encode_text(ids)`` as open_clip's.
    - ``preprocess``: :class:`mammut.ImagePreprocess`, PIL image -> ``(3, s, s)`` at the model's size.
    - ``tokenizer``: ``tokenizer(texts, context_length=None) -> LongTensor (b, n)``, padded to its
      ``context_length``, longer texts truncated with the end token kept; ``tokenizer.decode(ids)``.
    - ``checkpoint``: for a run folder, which checkpoint (a path, or a name under ``checkpoints/``).

    Zero-shot classification::

        import mammut, torch
        from PIL import Image
        model, preprocess, tokenizer = mammut.load("path/to/checkpoint_or_run")
        image, text = preprocess(Image.open("cat.jpg")).unsqueeze(0), tokenizer(["a cat", "a dog"])
        with torch.no_grad():
            probs = (100 * model.encode_image(image, normalize=True) @ model.encode_text(text, normalize=True).T).softmax(-1)
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected None or a floating torch.dtype, got {dtype!r}")
    path = _resolve_source(source)
    kind = _source_kind(path)
    if checkpoint is not None and kind != "run":
        raise ValueError(f"checkpoint: only a training run folder has several checkpoints to choose from; "
                         f"{str(path)!r} is {_KIND_NAMES[kind]}, got checkpoint={str(checkpoint)!r}")
    if kind == "mammut":
        model, preprocess, tokenizer = _load_mammut_checkpoint(path, device, dtype)
    elif kind == "run":
        model, preprocess, tokenizer = _load_run(path, checkpoint, device, dtype)
    else:
        model, preprocess, tokenizer = _load_open_clip(path, kind, device, dtype)
    if isinstance(preprocess, ImagePreprocess):
        size = model.image_size if isinstance(model, ImageSized) else None
        if isinstance(size, int) and size != preprocess.image_size:
            log.info("preprocess.image_size %d -> %d (the model's image size)", preprocess.image_size, size)
            preprocess = preprocess.with_image_size(size)
    return Loaded(model, preprocess, tokenizer)


# ============================================================================ source kinds
_KIND_NAMES = {
    "mammut": "a mammut checkpoint folder", "run": "a training run folder",
    "open_clip_dir": "an open_clip snapshot folder", "open_clip_file": "an open_clip checkpoint file",
}


def _resolve_source(source: Any) -> Path:
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return _hub_snapshot(source[len(HUB_PREFIX):])
    if not isinstance(source, (str, Path)) or not str(source):
        raise TypeError(f"source: expected a path or 'hf-hub:org/name', got {type(source).__name__} {source!r:.80}")
    path = Path(source).expanduser()
    if not path.exists():
        hint = " (a Hub repository? write it as 'hf-hub:org/name')" if isinstance(source, str) and source.count("/") == 1 else ""
        raise FileNotFoundError(f"source: no such file or folder {str(path)!r}{hint}")
    return path


def _hub_snapshot(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache; never the network."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import LocalEntryNotFoundError  # .errors only from 0.25
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("hf-hub: sources need huggingface_hub: pip install 'mammut-vl[io]'") from err
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"source: expected 'hf-hub:org/name', got {HUB_PREFIX + repo_id!r}")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"source: {HUB_PREFIX}{repo_id} is not in the local Hugging Face cache (mammut never downloads). "
            f"On a machine with network access run `huggingface-cli download {repo_id}` and copy the cache folder "
            f"(HF_HUB_CACHE, default ~/.cache/huggingface/hub) here, or pass the downloaded folder as source"
        ) from None


def _source_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"source: expected a checkpoint folder or an open_clip weights file ({', '.join(WEIGHT_SUFFIXES)}), "
                             f"got the file {str(path)!r}")
        return "open_clip_file"
    if (path / "config.json").is_file() and _is_mammut_config(path / "config.json"):
        return "mammut"
    if (path / "config.yaml").is_file():
        return "run"
    if (path / OPEN_CLIP_CONFIG).is_file() or any((path / name).is_file() for name in OPEN_CLIP_WEIGHTS):
        return "open_clip_dir"
    raise ValueError(
        f"source: {str(path)!r} is none of the folders mammut.load reads: a mammut checkpoint (config.json + "
        f"model.safetensors), a training run (config.yaml), an open_clip snapshot ({OPEN_CLIP_CONFIG} or "
        f"{' / '.join(OPEN_CLIP_WEIGHTS)}); found {sorted(p.name for p in path.iterdir())[:10]}"
    )


def _is_mammut_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == "mammut"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _to(model: nn.Module, device: Any, dtype: torch.dtype | None) -> nn.Module:
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


# ============================================================================ mammut's own
def _load_mammut_checkpoint(path: Path, device: Any, dtype: torch.dtype | None) -> tuple[nn.Module, Any, Any]:
    from .io.checkpoint import read_checkpoint_config
    from .models.companions import companion_paths, load_preprocess, load_tokenizer
    from .models.pretrained import load_pretrained

    document = read_checkpoint_config(path)
    model = load_pretrained(path, device=device, dtype=dtype)
    files = companion_paths(path, document)
    hint = "save it with model.save_pretrained(folder, preprocess=..., tokenizer=...)"
    preprocess: Any = MissingComponent(
        "preprocess", f"the checkpoint {str(path)!r} was saved without its image preprocessing (preprocess.json); {hint}, "
                      "or build one: mammut.ImagePreprocess(image_size, mean=..., std=...)")
    tokenizer: Any = MissingComponent(
        "tokenizer", f"the checkpoint {str(path)!r} was saved without its tokenizer (mammut_tokenizer.json); {hint}")
    if "preprocess" in files:
        preprocess = load_preprocess(files["preprocess"])
    if "tokenizer" in files:
        tokenizer = load_tokenizer(files["tokenizer"])
    return model, preprocess, tokenizer


def _load_run(path: Path, checkpoint: Any, device: Any, dtype: torch.dtype | None) -> tuple[nn.Module, Any, Any]:
    from .runs import load_run_model

    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.exists() and not ckpt.is_absolute() and (path / "checkpoints" / ckpt).exists():
            ckpt = path / "checkpoints" / ckpt
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint: no checkpoint {str(checkpoint)!r} (as a path or under {path / 'checkpoints'})")
        checkpoint = ckpt
    run = load_run_model(path, checkpoint)
    return _to(run.model, device, dtype), run.preprocess, run.tokenizer


# ============================================================================ open_clip
def _load_open_clip(path: Path, kind: str, device: Any, dtype: torch.dtype | None) -> tuple[nn.Module, Any, Any]:
    from .clip_tokenizer import CLIPTokenizer
    from .convert.open_clip import load_checkpoint

    model_cfg: dict[str, Any] | None = None
    preprocess_cfg: dict[str, Any] = {}
    if kind == "open_clip_dir":
        weights = next((path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"source: {str(path)!r} has {OPEN_CLIP_CONFIG} but no weights ({' or '.join(OPEN_CLIP_WEIGHTS)})")
        if (path / OPEN_CLIP_CONFIG).is_file():
            document = json.loads((path / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
            if not isinstance(document, dict) or not isinstance(document.get("model_cfg", {}), dict):
                raise ValueError(f"{path / OPEN_CLIP_CONFIG}: model_cfg: expected an object of the model's config")
            model_cfg = document.get("model_cfg")
            preprocess_cfg = document.get("preprocess_cfg") or {}
    else:
        weights = path
    state_dict = _read_weights(weights, load_checkpoint)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    family = _family(state_dict, weights)
    if model_cfg is None:
        name, model_cfg = detect_open_clip_architecture(state_dict, family=family, where=str(weights))
        log.warning("%s: no %s beside the weights; assumed the %s config from tensor shapes, which cannot show "
                    "head counts: %s. If the model was trained with other heads, pass its config: "
                    "mammut.%s.from_open_clip(config_dict, path)", weights, OPEN_CLIP_CONFIG, name,
                    _heads_text(model_cfg), "MaMMUT" if family == "mammut" else "CoCa")
    model_cfg = _with_weights_image_size(model_cfg, state_dict)
    if family == "coca":
        from .convert.open_clip import coca_from_open_clip as convert
    else:
        from .convert.open_mammut import mammut_from_open_clip as convert
    model = _to(convert(model_cfg, state_dict, dtype=dtype), device, None)
    text = model_cfg.get("text_cfg", {})
    if text.get("hf_tokenizer_name") or text.get("hf_model_name"):
        raise ValueError(f"{weights}: text_cfg names a Hugging Face tokenizer; only the CLIP BPE of open_clip is supported")
    length = int(text.get("context_length", 77))
    vision = model_cfg.get("vision_cfg", {})
    preprocess = ImagePreprocess.open_clip(int(vision.get("image_size", 224)), {k: v for k, v in preprocess_cfg.items() if k != "size"})
    return model, preprocess, CLIPTokenizer(context_length=length)


def _read_weights(weights: Path, load_checkpoint: Any) -> dict[str, torch.Tensor]:
    """``load_checkpoint(weights)`` (safetensors, or ``torch.load(weights_only=True)``), its
    refusals and read failures as one-line ``CheckpointError`` (a ``ValueError``) naming the file."""
    from .io.checkpoint import CheckpointError, refused_pickle

    try:
        return load_checkpoint(weights)
    except pickle.UnpicklingError as exc:  # weights_only refused it: nothing was unpickled, and nothing will be
        raise refused_pickle(weights, exc) from None
    except (RuntimeError, EOFError, KeyError, TypeError) as exc:  # torch.load of a broken file; dict() of a non-mapping
        if weights.suffix == ".safetensors":
            raise
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{weights}: expected a torch weights file holding a state dict of tensors, got one it "
                              f"cannot read ({type(exc).__name__}: {first[:160]})") from None


def _heads_text(model_cfg: dict[str, Any]) -> str:
    """``"vision 12 heads (head width 64), text 8 heads"`` of an open_clip model config."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    head_width = int(vision.get("head_width", 64))
    return (f"vision {int(vision.get('width', 768)) // head_width} heads (head width {head_width}), "
            f"text {int(text.get('heads', 8))} heads")


def _family(state_dict: dict[str, torch.Tensor], where: Path) -> str:
    if "map_viz2txt_kv" in state_dict:
        return "mammut"
    if any(k.startswith("text_decoder.") for k in state_dict):
        return "coca"
    raise ValueError(
        f"{where}: not an open_clip CoCa (text_decoder.* tensors) or openMaMMUT (map_viz2txt_kv) checkpoint; "
        f"a contrastive-only CLIP has no decoder for mammut's models. First keys: {sorted(state_dict)[:5]}"
    )


def _with_weights_image_size(model_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``model_cfg`` with ``vision_cfg.image_size`` read from the positional grid of the weights."""
    facts = _facts_from_state_dict(state_dict)
    size = facts.get("image_size")
    vision = dict(model_cfg.get("vision_cfg", {}))
    if size is None or vision.get("image_size", 224) == size:
        return model_cfg
    vision["image_size"] = size
    return {**model_cfg, "vision_cfg": vision}


def _count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)})


def _facts_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture numbers the tensor shapes show (heads are not among them)."""
    facts: dict[str, int] = {}
    conv = sd.get("visual.conv1.weight")
    if conv is not None and conv.ndim == 4:
        facts["vision_width"], facts["patch_size"] = int(conv.shape[0]), int(conv.shape[-1])
        pos = sd.get("visual.positional_embedding")
        if pos is not None and pos.ndim == 2:
            grid = round((pos.shape[0] - 1) ** 0.5)
            if grid * grid == pos.shape[0] - 1:
                facts["image_size"] = grid * facts["patch_size"]
    facts["vision_layers"] = _count(sd, "visual.transformer.resblocks.")
    emb = sd.get("text.token_embedding.weight")
    if emb is not None and emb.ndim == 2:
        facts["vocab_size"], facts["text_width"] = int(emb.shape[0]), int(emb.shape[1])
    proj = sd.get("visual.proj")
    if proj is not None and proj.ndim == 2:
        facts["embed_dim"] = int(proj.shape[1])
    if "map_viz2txt_kv" in sd:  # openMaMMUT: one decoder, cross-attention blocks beside some layers
        facts["text_layers"] = _count(sd, "text.resblocks.")
        facts["cross_layers"] = _count(sd, "text.cross_attn.")
    else:  # CoCa: a text tower and a multimodal decoder
        facts["text_layers"] = _count(sd, "text.transformer.resblocks.")
        facts["cross_layers"] = _count(sd, "text_decoder.resblocks.")
    return facts


def _facts_from_config(cfg: dict[str, Any], family: str) -> dict[str, int]:
    vis, txt = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    facts = dict(vision_width=vis.get("width", 768), patch_size=vis.get("patch_size", 16), vision_layers=vis.get("layers", 12),
                 vocab_size=txt.get("vocab_size", 49408), text_width=txt.get("width", 512), text_layers=txt.get("layers", 12),
                 embed_dim=cfg.get("embed_dim", 512))
    if family == "coca":
        facts["cross_layers"] = cfg.get("multimodal_cfg", {}).get("layers", 12)
    else:
        facts["cross_layers"] = facts["text_layers"] // max(1, int(txt.get("cross_attn_ratio", 1)))
    return facts


def detect_open_clip_architecture(state_dict: dict[str, torch.Tensor], family: str | None = None,
                                  where: str = "state_dict") -> tuple[str, dict[str, Any]]:
    """``(name, config)`` of the known open_clip CoCa / openMaMMUT config whose tensor shapes
    ``state_dict`` has (``family``: ``"coca"`` / ``"mammut"``, default: from the keys). The
    config's ``image_size`` is the base model's; :func:`load` takes the weights' grid."""
    from .convert.open_clip import OPEN_CLIP_COCA_MODELS, open_clip_model_config
    from .convert.open_mammut import OPEN_MAMMUT_CONFIGS

    family = family or _family(state_dict, Path(where))
    if family == "coca":
        candidates = {name: open_clip_model_config(name) for name in OPEN_CLIP_COCA_MODELS}
    elif family == "mammut":
        candidates = dict(OPEN_MAMMUT_CONFIGS)
    else:
        raise ValueError(f"family: expected 'coca', 'mammut' or None, got {family!r}")
    facts = {k: v for k, v in _facts_from_state_dict(state_dict).items() if k != "image_size"}
    matches = [name for name, cfg in candidates.items() if _facts_from_config(cfg, family) == facts]
    if len(matches) == 1:
        import copy

        return matches[0], copy.deepcopy(candidates[matches[0]])
    kind = "open_clip CoCa" if family == "coca" else "openMaMMUT"
    converter = "coca_from_open_clip" if family == "coca" else "mammut_from_open_clip"
    problem = f"several known {kind} configs fit ({', '.join(matches)})" if matches else f"no known {kind} config fits"
    raise ValueError(
        f"{where}: {problem}; its shapes say {facts}; known: {', '.join(candidates)}. Convert it with its config: "
        f"mammut.convert.{converter}(config_dict, path)"
    )

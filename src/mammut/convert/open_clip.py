"""Import open_clip CoCa checkpoints (``coca_ViT-B-32``, ``coca_ViT-L-14``: the architectures of
the published ``laion2b_s13b_b90k`` and ``mscoco_finetuned_laion2b_s13b_b90k`` weights) into
mammut's :class:`~mammut.models.coca.CoCa`. :func:`coca_from_open_clip` is registered in
``mammut.convert.OPEN_CLIP_CONVERTERS`` under ``"coca"``: ``CoCa.from_open_clip`` runs it.

The architecture is read from the installed open_clip package's ``model_configs/<name>.json``
(open_clip itself is not imported for that); every open_clip feature the conversion cannot
express exactly raises a ``ValueError`` naming it. Nothing is downloaded: pass the weights.

open_clip CoCa -> mammut CoCa:

- image tower (OpenAI-style ViT) -> :class:`~mammut.encoders.ViT` with ``class_token``,
  ``pre_norm``, ``bias``, ``patch_bias=False``, ``final_norm=False``;
- ``visual.attn_pool`` (256 queries, normed queries) + ``ln_post`` -> one shared
  :class:`~mammut.layers.AttentionPooler`; query 0 (through ``proj``) is the contrastive
  embedding, queries 1..255 the decoder's context;
- text tower (learned positions, CLS appended after the padded text, open_clip's original
  CLS mask) -> the unimodal layers; ``ln_final`` -> ``text_cls_norm``; ``text_projection`` ->
  ``text_to_latents``;
- ``text_decoder`` (self-attention block + cross-attention block, each with its own MLP) ->
  the multimodal layers, ``ln_final`` -> ``norm``, ``text_projection`` -> ``to_logits`` (untied).

``nn.MultiheadAttention``'s ``in_proj_weight`` rows are q, k, v in that order, as our fused
``to_qkv``; cross-attention splits them into ``to_q`` and ``to_kv``.

Images must be preprocessed as open_clip does (resize/crop to 224, OpenAI CLIP mean/std).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..models.coca import CoCa, CoCaConfig

__all__ = [
    "OPEN_CLIP_COCA_MODELS",
    "open_clip_model_config",
    "coca_config_from_open_clip",
    "convert_open_clip_coca_state_dict",
    "coca_from_open_clip",
    "load_checkpoint",
    # the helpers every converter of open_clip-layout weights shares (open_mammut.py uses them)
    "as_state_dict",
    "check_required",
    "StateDictMapper",
]

log = logging.getLogger(__name__)

OPEN_CLIP_COCA_MODELS = ("coca_ViT-B-32", "coca_ViT-L-14")
SOT_ID, EOT_ID, PAD_ID, VOCAB_SIZE = 49406, 49407, 0, 49408

# open_clip's dataclass defaults for the fields its CoCa JSON configs leave out
_VISION_DEFAULTS = dict(head_width=64, mlp_ratio=4.0, attn_pooler_queries=256, attn_pooler_heads=8, image_size=224)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0, pad_id=0)
_MULTIMODAL_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)
# options that must keep these values (anything else has no exact counterpart here)
_VISION_REQUIRED = dict(
    attentional_pool=True, ls_init_value=None, no_ln_pre=False, pos_embed_type="learnable", pool_type="tok",
    timm_model_name=None, block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
    scale_attn_inner=False, scale_attn=False, scale_fc=False, act_kwargs=None, norm_kwargs=None,
)
_TEXT_REQUIRED = dict(
    embed_cls=True, hf_model_name=None, ls_init_value=None, no_causal_mask=False, proj_type="linear",
    proj_bias=False, block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
    scale_attn_inner=False, scale_attn=False, scale_fc=False, act_kwargs=None, norm_kwargs=None,
)
_TOP_REQUIRED = dict(init_logit_bias=None, nonscalar_logit_scale=False)


# ---------------------------------------------------------------------------- configs
def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError("open_clip is not installed: pip install 'mammut-vl[interop]' (open-clip-torch)")
    return Path(spec.origin).parent


def open_clip_model_config(model_name: str) -> dict[str, Any]:
    """The installed open_clip's ``model_configs/<model_name>.json`` as a dict."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name: expected a str, got {type(model_name).__name__}")
    path = _open_clip_dir() / "model_configs" / f"{model_name}.json"
    if not path.is_file():
        raise ValueError(f"model_name: expected one of {OPEN_CLIP_COCA_MODELS} (open_clip model_configs), got {model_name!r}")
    return json.loads(path.read_text())


def check_required(section: str, cfg: Mapping[str, Any], required: Mapping[str, Any]) -> None:
    for key, want in required.items():
        got = cfg.get(key, want)
        if got != want and not (want is None and got in ("default", None)):
            raise ValueError(f"{section}.{key}: the conversion supports only {want!r}, got {got!r}")


def coca_config_from_open_clip(oc_cfg: Mapping[str, Any]) -> CoCaConfig:
    """The :class:`CoCaConfig` (with its built-in ViT) equivalent to an open_clip CoCa config."""
    for key in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        if key not in oc_cfg:
            raise ValueError(f"model config: expected an open_clip CoCa config with {key!r}, got keys {sorted(oc_cfg)}")
    check_required("model config", oc_cfg, _TOP_REQUIRED)
    vis = {**_VISION_DEFAULTS, **oc_cfg["vision_cfg"]}
    txt = {**_TEXT_DEFAULTS, **oc_cfg["text_cfg"]}
    mm = {**_MULTIMODAL_DEFAULTS, **oc_cfg["multimodal_cfg"]}
    check_required("vision_cfg", vis, _VISION_REQUIRED)
    check_required("text_cfg", txt, _TEXT_REQUIRED)
    check_required("multimodal_cfg", mm, dict(ls_init_value=None))
    embed_dim = int(oc_cfg["embed_dim"])
    if not isinstance(vis["layers"], int) or not isinstance(vis["image_size"], int) or not isinstance(vis["patch_size"], int):
        raise ValueError("vision_cfg: the conversion supports a plain square ViT (int layers, image_size, patch_size)")
    if not txt["width"] == mm["width"] == embed_dim:
        raise ValueError(
            f"model config: expected text width == multimodal width == embed_dim, got {txt['width']}, {mm['width']}, {embed_dim}"
        )
    if txt["heads"] != mm["heads"] or txt["mlp_ratio"] != mm["mlp_ratio"] or txt["vocab_size"] != mm["vocab_size"]:
        raise ValueError("model config: expected the text tower and the decoder to share heads, mlp_ratio and vocab_size")
    for name, c in (("text_cfg", txt), ("multimodal_cfg", mm), ("vision_cfg (attn pooler)", dict(width=embed_dim, heads=vis["attn_pooler_heads"]))):
        if c["width"] % c["heads"]:
            raise ValueError(f"{name}: width {c['width']} is not a multiple of heads {c['heads']}")
    activation = "quickgelu" if oc_cfg.get("quick_gelu", False) else "gelu"
    vit = dict(
        image_size=vis["image_size"], patch_size=vis["patch_size"], dim=vis["width"], depth=vis["layers"],
        heads=vis["width"] // vis["head_width"], dim_head=vis["head_width"], mlp_mult=vis["mlp_ratio"],
        activation=activation, class_token=True, pre_norm=True, final_norm=False, bias=True, patch_bias=False,
    )
    return CoCaConfig(
        dim=embed_dim, num_tokens=txt["vocab_size"], unimodal_depth=txt["layers"], multimodal_depth=mm["layers"],
        heads=txt["heads"], dim_head=txt["width"] // txt["heads"], ff_mult=txt["mlp_ratio"], image_dim=vis["width"],
        dim_latents=embed_dim, pad_id=txt["pad_id"], bos_id=SOT_ID, eos_id=EOT_ID,
        image_pool="shared", num_img_queries=vis["attn_pooler_queries"] - 1, pool_heads=vis["attn_pooler_heads"],
        pool_dim_head=embed_dim // vis["attn_pooler_heads"], pool_norm_queries=True,
        block="sequential", activation=activation, positions="learned", max_text_len=txt["context_length"],
        cls_position="end", cls_mask="text" if txt.get("correct_cls_mask", False) else "open_clip_legacy",
        context_norm=True, bias=True, tie_embeddings=False, vit=vit,
    )


# ---------------------------------------------------------------------------- weights
def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch checkpoint file (``state_dict`` unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state_dict_or_path: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return dict(sd)


def as_state_dict(state_dict_or_path: Any) -> dict[str, torch.Tensor]:
    """A state dict from a state dict, a checkpoint path or a model (``module.`` prefixes of a
    DDP-wrapped save removed)."""
    if isinstance(state_dict_or_path, nn.Module):
        sd = state_dict_or_path.state_dict()
    elif isinstance(state_dict_or_path, (str, Path)):
        sd = load_checkpoint(state_dict_or_path)
    elif isinstance(state_dict_or_path, Mapping):
        sd = dict(state_dict_or_path)
    else:
        raise TypeError(
            "state_dict_or_path: expected a state dict, a checkpoint path or an open_clip model, "
            f"got {type(state_dict_or_path).__name__}"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


class StateDictMapper:
    """Collects ``ours <- theirs`` tensors and remembers which of theirs were used."""

    def __init__(self, theirs: Mapping[str, torch.Tensor]) -> None:
        self.theirs, self.out, self.used = theirs, {}, set()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.theirs:
            raise KeyError(key)
        self.used.add(key)
        return self.theirs[key]

    def put(self, ours: str, value: torch.Tensor) -> None:
        self.out[ours] = value

    def copy(self, ours: str, theirs: str) -> None:
        self.put(ours, self.get(theirs))

    def norm(self, ours: str, theirs: str) -> None:
        self.copy(f"{ours}.weight", f"{theirs}.weight")
        self.copy(f"{ours}.bias", f"{theirs}.bias")

    def linear(self, ours: str, theirs: str) -> None:
        self.norm(ours, theirs)  # weight and bias, same names

    def mlp(self, ours: str, theirs: str) -> None:
        self.linear(f"{ours}.proj_in", f"{theirs}.c_fc")
        self.linear(f"{ours}.proj_out", f"{theirs}.c_proj")

    def self_block(self, ours: str, theirs: str, *, mlp: bool = True) -> None:
        """open_clip ResidualAttentionBlock -> TransformerBlock (``mlp=False``: attention only)."""
        self.norm(f"{ours}.norm1", f"{theirs}.ln_1")
        self.copy(f"{ours}.attn.to_qkv.weight", f"{theirs}.attn.in_proj_weight")
        self.copy(f"{ours}.attn.to_qkv.bias", f"{theirs}.attn.in_proj_bias")
        self.linear(f"{ours}.attn.to_out", f"{theirs}.attn.out_proj")
        if mlp:
            self.norm(f"{ours}.norm2", f"{theirs}.ln_2")
            self.mlp(f"{ours}.ff", f"{theirs}.mlp")

    def cross_block(self, ours: str, theirs: str, dim: int) -> None:
        """open_clip ResidualAttentionBlock used as cross-attention (``ln_1_kv`` on the context,
        its own MLP) -> CrossAttentionBlock with a sequential feed-forward."""
        self.norm(f"{ours}.norm", f"{theirs}.ln_1")
        self.norm(f"{ours}.attn.context_norm", f"{theirs}.ln_1_kv")
        self.cross_attention(f"{ours}.attn", f"{theirs}.attn", dim)
        self.norm(f"{ours}.norm2", f"{theirs}.ln_2")
        self.mlp(f"{ours}.ff", f"{theirs}.mlp")

    def openai_vit(self, depth: int) -> None:
        """open_clip's OpenAI-style image tower (``visual.*``: ``conv1`` without bias, class
        token, positional embedding over CLS + patches, ``ln_pre``, ``depth`` blocks) ->
        :class:`~mammut.encoders.ViT` ``img_encoder.*`` (its grid read from the weights)."""
        self.copy("img_encoder.to_patches.weight", "visual.conv1.weight")
        pos = self.get("visual.positional_embedding")
        grid = round((pos.shape[0] - 1) ** 0.5)
        if grid * grid != pos.shape[0] - 1:
            raise ValueError(f"visual.positional_embedding: expected 1 + grid^2 rows, got {pos.shape[0]}")
        self.put("img_encoder.cls_pos_emb", pos[0])
        self.put("img_encoder.pos_emb", pos[1:].t().reshape(1, pos.shape[1], grid, grid))
        self.copy("img_encoder.cls_token", "visual.class_embedding")
        self.norm("img_encoder.pre_norm", "visual.ln_pre")
        for i in range(depth):
            self.self_block(f"img_encoder.blocks.{i}", f"visual.transformer.resblocks.{i}")

    def cross_attention(self, ours: str, theirs: str, dim: int) -> None:
        """nn.MultiheadAttention used as cross-attention -> CrossAttention (to_q, fused to_kv)."""
        if f"{theirs}.in_proj_weight" in self.theirs:
            w = self.get(f"{theirs}.in_proj_weight")
            wq, wkv = w[:dim], w[dim:]
        else:  # separate projections (key/value width differs from the query width)
            wq = self.get(f"{theirs}.q_proj_weight")
            wkv = torch.cat((self.get(f"{theirs}.k_proj_weight"), self.get(f"{theirs}.v_proj_weight")), dim=0)
        b = self.get(f"{theirs}.in_proj_bias")
        self.put(f"{ours}.to_q.weight", wq)
        self.put(f"{ours}.to_kv.weight", wkv)
        self.put(f"{ours}.to_q.bias", b[:dim])
        self.put(f"{ours}.to_kv.bias", b[dim:])
        self.linear(f"{ours}.to_out", f"{theirs}.out_proj")


def convert_open_clip_coca_state_dict(state_dict: Mapping[str, torch.Tensor], config: CoCaConfig) -> dict[str, torch.Tensor]:
    """open_clip CoCa state dict -> mammut CoCa state dict for ``config`` (from
    :func:`coca_config_from_open_clip`). Raises ``ValueError`` listing missing or unused keys."""
    m = StateDictMapper(state_dict)
    d = config.dim
    try:
        m.openai_vit(config.vit["depth"])  # image tower
        # attention pooler; ln_post is the pooler's output norm, proj the image latent projection
        m.copy("img_pool.queries", "visual.attn_pool.query")
        m.norm("img_pool.query_norm", "visual.attn_pool.ln_q")
        m.norm("img_pool.attn.context_norm", "visual.attn_pool.ln_k")
        m.cross_attention("img_pool.attn", "visual.attn_pool.attn", d)
        m.norm("img_pool.norm", "visual.ln_post")
        m.put("img_to_latents.weight", m.get("visual.proj").t())
        # text tower
        m.copy("token_emb.weight", "text.token_embedding.weight")
        m.copy("pos_emb", "text.positional_embedding")
        m.copy("text_cls", "text.cls_emb")
        for i in range(config.unimodal_depth):
            m.self_block(f"unimodal_layers.{i}", f"text.transformer.resblocks.{i}")
        m.norm("text_cls_norm", "text.ln_final")
        m.put("text_to_latents.weight", m.get("text.text_projection").t())
        # multimodal decoder
        for i in range(config.multimodal_depth):
            ours, theirs = f"multimodal_layers.{i}", f"text_decoder.cross_attn.{i}"
            m.self_block(f"{ours}.block", f"text_decoder.resblocks.{i}")
            m.cross_block(f"{ours}.cross", theirs, d)
        m.norm("norm", "text_decoder.ln_final")
        m.put("to_logits.weight", m.get("text_decoder.text_projection").t())
        m.put("contrastive.logit_scale.log_scale", m.get("logit_scale").reshape(()))
    except KeyError as e:
        raise ValueError(f"state_dict: missing open_clip CoCa key {e.args[0]!r} for this config") from None
    unused = sorted(set(state_dict) - m.used)
    if unused:
        raise ValueError(f"state_dict: {len(unused)} open_clip keys have no place in this config, e.g. {unused[:5]}")
    return {k: v.detach().clone().contiguous() for k, v in m.out.items()}


def coca_from_open_clip(
    model_name: str | Mapping[str, Any],
    state_dict_or_path: Any,
    *,
    dtype: torch.dtype | None = None,
) -> CoCa:
    """A mammut :class:`CoCa` holding open_clip CoCa weights.

    ``model_name``: ``"coca_ViT-B-32"``, ``"coca_ViT-L-14"`` (read from the installed open_clip's
    model configs) or an open_clip CoCa config dict (e.g. one with fewer layers).
    ``state_dict_or_path``: the open_clip state dict, a checkpoint file (``.pt``/``.bin``/
    ``.safetensors``, e.g. ``open_clip_pytorch_model.bin`` of ``laion/CoCa-ViT-B-32-laion2B-s13B-b90k``)
    or an open_clip model. The result is in eval mode; tokens are open_clip's CLIP BPE ids
    (``mammut.clip_tokenizer.CLIPTokenizer``): vocab 49408, start 49406, end 49407, pad 0.
    """
    if isinstance(model_name, Mapping):
        oc_cfg = copy.deepcopy(dict(model_name))
    else:
        oc_cfg = open_clip_model_config(model_name)
    config = coca_config_from_open_clip(oc_cfg)
    sd = convert_open_clip_coca_state_dict(as_state_dict(state_dict_or_path), config)
    with torch.device("meta"):
        model = CoCa(config)
    model.load_state_dict(sd, strict=True, assign=True)
    unset = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:  # pragma: no cover - every tensor of this config comes from the checkpoint
        raise RuntimeError(f"coca_from_open_clip: tensors left unset after loading: {unset[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    log.info("imported open_clip CoCa %s", model_name if isinstance(model_name, str) else "(config dict)")
    return model.eval()

"""Import openMaMMUT checkpoints (LAION's open_clip fork ``LAION-AI/open_clip_mammut``: the
published ``openMaMMUT-ViT-L-14`` weights and its 512 px fine-tune) into mammut's
:class:`~mammut.models.mammut.MaMMUT`. :func:`mammut_from_open_clip` is registered in
``mammut.convert.OPEN_CLIP_CONVERTERS`` under ``"mammut"``: ``MaMMUT.from_open_clip`` runs it.

The fork is not on PyPI, so its ``mammut_ViT-*`` model configs are written out here
(:data:`OPEN_MAMMUT_CONFIGS`, in the fork's JSON schema); a config dict in that schema works too.
Every fork option the conversion cannot express exactly raises a ``ValueError`` naming it.
Nothing is downloaded: pass the weights.

openMaMMUT -> MaMMUT options (see ``mammut.models.mammut``):

- image tower (OpenAI-style ViT: ``conv1`` without bias, class token, ``ln_pre``, pre-norm
  blocks) -> :class:`~mammut.encoders.ViT` with ``class_token``, ``pre_norm``, ``bias``,
  ``patch_bias=False``, ``final_norm=False``;
- contrastive image embedding ``ln_post(mean of ALL tokens, CLS included) @ proj`` ->
  ``image_pool="norm_mean"`` (``img_norm``, ``img_to_latents``);
- cross-attention context ``tokens @ map_viz2txt_kv`` (a bare parameter) ->
  ``context_proj="linear"`` (``img_proj``, no bias);
- text decoder ``text.resblocks.i`` (pre-norm, biases, GELU) -> ``block="sequential"``,
  ``bias=True``; ``text.cross_attn.j`` after the self-attention of 0-indexed layers
  ``i % (layers // (layers // cross_attn_ratio)) == 0`` -> ``cross_attend_layers`` (1-indexed
  1, 3, 5, ... for ratio 2), each with ``ln_1_kv`` on the context and its own MLP; with
  ``has_mlp: false`` the self-attention blocks of those layers have no MLP ->
  ``cross_self_ff=False``;
- learned ``positional_embedding`` (position = index) -> ``positions="learned"``;
- contrastive text embedding: the pass without the image attends to every position, pads
  included, and averages ``ln_final`` over all of them, no projection ->
  ``text_pool="mean_all"``, ``text_proj=False`` (so texts must be padded to 77 tokens as the
  fork's tokenizer does: ``CLIPTokenizer(context_length=77)``);
- ``text.ln_final`` -> ``norm``; ``text.text_projection`` (width x vocab) -> the untied
  ``to_logits``; ``logit_scale`` -> the softmax contrastive loss's temperature.

Images must be preprocessed as open_clip does (resize the shorter side to 224 bicubic, centre
crop, OpenAI CLIP mean/std); tokens are CLIP BPE ids (start 49406, end 49407, pad 0).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import torch

from ..models.mammut import MaMMUT, MaMMUTConfig
from .open_clip import EOT_ID, PAD_ID, SOT_ID, as_state_dict, check_required, StateDictMapper

__all__ = [
    "OPEN_MAMMUT_MODELS",
    "OPEN_MAMMUT_CONFIGS",
    "open_mammut_config",
    "fork_cross_attention_layers",
    "mammut_config_from_open_clip",
    "convert_open_mammut_state_dict",
    "mammut_from_open_clip",
]

log = logging.getLogger(__name__)


def _fork_config(vision: tuple[int, int, int], patch: int, text: tuple[int, int, int], embed_dim: int,
                 *, has_mlp: bool = True, head_width: int = 64) -> dict[str, Any]:
    """A ``mammut_ViT-*`` config of the fork in its JSON schema. ``vision``: (layers, width,
    head width is separate); ``text``: (layers, width, heads)."""
    v_layers, v_width, _ = vision
    t_layers, t_width, t_heads = text
    vision_cfg = dict(image_size=224, layers=v_layers, width=v_width, patch_size=patch, output_tokens=True,
                      pool_type="avg_all", final_ln_after_pool=True)
    if head_width != 64:
        vision_cfg["head_width"] = head_width
    text_cfg = dict(context_length=77, vocab_size=49408, width=t_width, heads=t_heads, layers=t_layers,
                    output_tokens=True, cross_attn_ratio=2, does_full_decoding=True)
    if not has_mlp:
        text_cfg["has_mlp"] = False
    return dict(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, custom_text=True)


# the fork's model_configs/mammut_ViT-*.json (architecture hyper-parameters)
_SIZES = {
    #     vision (layers, width, -)  text (layers, width, heads)  embed  has_mlp  head_width
    "S": ((12, 384, 0), (12, 384, 6), 384, False, 64),
    "M": ((12, 512, 0), (12, 512, 8), 512, False, 64),
    "L": ((24, 1024, 0), (12, 768, 12), 768, True, 64),
    "H": ((32, 1280, 0), (24, 1024, 16), 1024, True, 80),
}
OPEN_MAMMUT_CONFIGS: dict[str, dict[str, Any]] = {
    f"mammut_ViT-{size}-{patch}": _fork_config(v, patch, t, e, has_mlp=m, head_width=hw)
    for size, (v, t, e, m, hw) in _SIZES.items()
    for patch in (14, 16, 32)
}
# B: text 512 wide without the extra MLP, except B-16 (text 768 wide, embed 768, with MLP)
OPEN_MAMMUT_CONFIGS["mammut_ViT-B-14"] = _fork_config((12, 768, 0), 14, (12, 512, 8), 512, has_mlp=False)
OPEN_MAMMUT_CONFIGS["mammut_ViT-B-16"] = _fork_config((12, 768, 0), 16, (12, 768, 12), 768)
OPEN_MAMMUT_CONFIGS["mammut_ViT-B-32"] = _fork_config((12, 768, 0), 32, (12, 512, 8), 512, has_mlp=False)
OPEN_MAMMUT_CONFIGS = dict(sorted(OPEN_MAMMUT_CONFIGS.items()))
OPEN_MAMMUT_MODELS = tuple(OPEN_MAMMUT_CONFIGS)

# the fork's dataclass defaults for fields its JSON configs leave out
_VISION_DEFAULTS = dict(head_width=64, mlp_ratio=4.0, image_size=224, pool_type="tok", final_ln_after_pool=False)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                      cross_attn_ratio=1, does_full_decoding=False, has_mlp=True)
_VISION_REQUIRED = dict(
    attentional_pool=False, ls_init_value=None, no_ln_pre=False, pos_embed_type="learnable", pool_type="avg_all",
    final_ln_after_pool=True, timm_model_name=None, patch_dropout=0.0, act_kwargs=None, norm_kwargs=None,
)
_TEXT_REQUIRED = dict(does_full_decoding=True, hf_model_name=None, ls_init_value=None, act_kwargs=None, norm_kwargs=None)
_TOP_REQUIRED = dict(init_logit_bias=None, nonscalar_logit_scale=False)


def fork_cross_attention_layers(layers: int, cross_attn_ratio: int) -> tuple[int, ...]:
    """1-indexed decoder layers with cross-attention under the fork's rule: ``n = layers //
    ratio`` cross-attention blocks, one after the self-attention of every ``layers // n``-th
    layer starting at the first (0-indexed ``i % (layers // n) == 0``)."""
    n = layers // cross_attn_ratio
    if n < 1:
        raise ValueError(f"text_cfg.cross_attn_ratio: expected at most layers={layers}, got {cross_attn_ratio}")
    step = layers // n
    chosen = tuple(i + 1 for i in range(layers) if i % step == 0)
    if len(chosen) != n:  # the fork asserts this too
        raise ValueError(f"text_cfg: layers={layers} with cross_attn_ratio={cross_attn_ratio} gives {len(chosen)} "
                         f"cross-attention blocks under the fork's rule, expected {n}")
    return chosen


def mammut_config_from_open_clip(oc_cfg: Mapping[str, Any]) -> MaMMUTConfig:
    """The :class:`MaMMUTConfig` (with its built-in ViT) equivalent to an openMaMMUT config."""
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in oc_cfg:
            raise ValueError(f"model config: expected an openMaMMUT config with {key!r}, got keys {sorted(oc_cfg)}")
    if "multimodal_cfg" in oc_cfg:
        raise ValueError("model config: this is an open_clip CoCa config (multimodal_cfg); use CoCa.from_open_clip")
    check_required("model config", oc_cfg, _TOP_REQUIRED)
    vis = {**_VISION_DEFAULTS, **oc_cfg["vision_cfg"]}
    txt = {**_TEXT_DEFAULTS, **oc_cfg["text_cfg"]}
    check_required("vision_cfg", vis, _VISION_REQUIRED)
    check_required("text_cfg", txt, _TEXT_REQUIRED)
    for name in ("layers", "image_size", "patch_size", "width"):
        if not isinstance(vis[name], int):
            raise ValueError(f"vision_cfg.{name}: the conversion supports a plain square ViT (an int), got {vis[name]!r}")
    embed_dim, width, heads = int(oc_cfg["embed_dim"]), int(txt["width"]), int(txt["heads"])
    if embed_dim != width:
        raise ValueError(f"model config: openMaMMUT has no text projection, expected embed_dim == text_cfg.width, "
                         f"got {embed_dim} and {width}")
    if width % heads or vis["width"] % vis["head_width"]:
        raise ValueError(f"model config: widths must be multiples of the heads (text {width}/{heads}, "
                         f"vision {vis['width']}/{vis['head_width']})")
    activation = "quickgelu" if oc_cfg.get("quick_gelu", False) else "gelu"
    vit = dict(
        image_size=vis["image_size"], patch_size=vis["patch_size"], dim=vis["width"], depth=vis["layers"],
        heads=vis["width"] // vis["head_width"], dim_head=vis["head_width"], mlp_mult=vis["mlp_ratio"],
        activation=activation, class_token=True, pre_norm=True, final_norm=False, bias=True, patch_bias=False,
    )
    clip_vocab = int(txt["vocab_size"]) > EOT_ID
    return MaMMUTConfig(
        dim=width, num_tokens=int(txt["vocab_size"]), depth=int(txt["layers"]),
        cross_attend_layers=fork_cross_attention_layers(int(txt["layers"]), int(txt["cross_attn_ratio"])),
        dim_head=width // heads, heads=heads, ff_mult=float(txt["mlp_ratio"]), image_dim=vis["width"],
        dim_latents=embed_dim, caption_loss_weight=2.0, contrastive_loss_weight=1.0,  # open_clip_train's CoCa loss
        # CLIP BPE's start/end ids; a smaller test vocabulary has none (pass a prompt and eos_id)
        pad_id=PAD_ID, bos_id=SOT_ID if clip_vocab else None, eos_id=EOT_ID if clip_vocab else None, contrastive_pass="bidirectional", text_pool="mean_all",
        image_pool="norm_mean", context_proj="linear", contrastive_loss="softmax", tie_embeddings=False,
        text_proj=False, block="sequential", activation=activation, bias=True, positions="learned",
        max_text_len=int(txt["context_length"]), cross_self_ff=bool(txt["has_mlp"]), vit=vit,
    )


def convert_open_mammut_state_dict(state_dict: Mapping[str, torch.Tensor], config: MaMMUTConfig) -> dict[str, torch.Tensor]:
    """openMaMMUT state dict -> mammut MaMMUT state dict for ``config`` (from
    :func:`mammut_config_from_open_clip`). Raises ``ValueError`` listing missing or unused keys."""
    m = StateDictMapper(state_dict)
    d = config.dim
    try:
        m.openai_vit(config.vit["depth"])
        m.norm("img_norm", "visual.ln_post")
        m.put("img_to_latents.weight", m.get("visual.proj").t())
        m.put("img_proj.weight", m.get("map_viz2txt_kv").t())
        m.copy("token_emb.weight", "text.token_embedding.weight")
        m.copy("pos_emb", "text.positional_embedding")
        cross = config.cross_attention_layers()
        for i in range(config.depth):
            ours, theirs = f"layers.{i}.block", f"text.resblocks.{i}"
            has_cross = (i + 1) in cross
            # without cross_self_ff the cross-attention block brings the layer's only MLP
            m.self_block(ours, theirs, mlp=config.cross_self_ff or not has_cross)
            if has_cross:
                m.cross_block(f"layers.{i}.cross", f"text.cross_attn.{cross.index(i + 1)}", d)
        m.norm("norm", "text.ln_final")
        m.put("to_logits.weight", m.get("text.text_projection").t())
        m.put("contrastive.logit_scale.log_scale", m.get("logit_scale").reshape(()))
    except KeyError as e:
        raise ValueError(f"state_dict: missing openMaMMUT key {e.args[0]!r} for this config") from None
    unused = sorted(set(state_dict) - m.used - {"text.attn_mask"})
    if unused:
        raise ValueError(f"state_dict: {len(unused)} openMaMMUT keys have no place in this config, e.g. {unused[:5]}")
    return {k: v.detach().clone().contiguous() for k, v in m.out.items()}


def open_mammut_config(model_name: str) -> dict[str, Any]:
    """The fork's config ``model_name`` (``mammut_ViT-L-14`` ...) in its JSON schema."""
    if not isinstance(model_name, str) or model_name not in OPEN_MAMMUT_CONFIGS:
        raise ValueError(f"model_name: expected one of {', '.join(OPEN_MAMMUT_MODELS)} (openMaMMUT configs), got {model_name!r}")
    return copy.deepcopy(OPEN_MAMMUT_CONFIGS[model_name])


def mammut_from_open_clip(
    model_name: str | Mapping[str, Any],
    state_dict_or_path: Any,
    *,
    dtype: torch.dtype | None = None,
) -> MaMMUT:
    """A mammut :class:`MaMMUT` holding openMaMMUT weights, converted exactly.

    ``model_name``: ``"mammut_ViT-L-14"`` (the published weights) or any ``mammut_ViT-*`` config
    of the fork (:data:`OPEN_MAMMUT_MODELS`), or a config dict in the fork's JSON schema.
    ``state_dict_or_path``: the fork's state dict, a checkpoint file (``.pt``/``.bin``/
    ``.safetensors``, loaded with ``weights_only=True``) or a model. The positional grid is read
    from the weights, so a fine-tune at another resolution (the 512 px openMaMMUT) loads with
    the same name. Every tensor is mapped and shape-checked before the model holds any of
    them. The result is in eval mode.
    """
    oc_cfg = copy.deepcopy(dict(model_name)) if isinstance(model_name, Mapping) else open_mammut_config(model_name)
    sd = as_state_dict(state_dict_or_path)
    pos = sd.get("visual.positional_embedding")
    if pos is not None and pos.ndim == 2:  # the checkpoint's resolution wins over the config's
        grid = round((pos.shape[0] - 1) ** 0.5)
        patch = oc_cfg["vision_cfg"]["patch_size"]
        if grid * grid == pos.shape[0] - 1 and grid * patch != oc_cfg["vision_cfg"].get("image_size", 224):
            log.info("openMaMMUT weights have a %dx%d positional grid: image_size %d", grid, grid, grid * patch)
            oc_cfg["vision_cfg"]["image_size"] = grid * patch
    config = mammut_config_from_open_clip(oc_cfg)
    converted = convert_open_mammut_state_dict(sd, config)
    with torch.device("meta"):
        model = MaMMUT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: expected {expected[k]}, got {tuple(v.shape)}" for k, v in converted.items() if k in expected and tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"state_dict: {len(wrong)} openMaMMUT tensors do not fit this config, e.g. {wrong[:3]}")
    model.load_state_dict(converted, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    log.info("imported openMaMMUT %s", model_name if isinstance(model_name, str) else "(config dict)")
    return model.eval()

"""M2PT, Multimodal Pathway (arXiv 2401.14405): improve a target transformer with the weights
of a transformer trained on another modality.

Every chosen linear layer of the target computes ``x @ (W + lambda * W_aux).T + b``, where
``W_aux`` is the matching layer of the auxiliary model, ``lambda`` (the paper's "cross-modal
scale") a learnable scalar that starts at 0, and both ``W`` and ``W_aux`` keep training. Only
the target's bias is used. After training ``W + lambda * W_aux`` is folded into one plain
``nn.Linear``: inference costs exactly what the target alone costs.

Legend: ``b`` batch, ``n`` tokens, ``d`` model width, ``i`` / ``o`` a linear layer's in / out
features (weights are ``(o, i)`` as in ``nn.Linear``).

Three levels of API:
- ``CrossModalReparameterization(original_linear, auxiliary_linear)``: one pathway linear;
  ``merge_parameters()`` folds it in place and returns a plain ``nn.Linear``.
- ``add_pathways(target, auxiliary)`` / ``merge_pathways(model)``: the paper's recipe for a
  whole model (our ViT, the MaMMUT decoder, timm / Hugging Face transformers, ...).
- ``MPTransformerBlock``: one pre-norm transformer block (the shared ``TransformerBlock``)
  whose attention and feed-forward linears are pathway linears; the seed package's signature.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ..layers import TransformerBlock, linear

__all__ = [
    "CrossModalReparameterization",
    "MPTransformerBlock",
    "add_pathways",
    "merge_pathways",
    "pathway_scales",
    "select_linears",
]

logger = logging.getLogger(__name__)

# which linears ``add_pathways`` wraps: None (every linear inside a repeated block), a regex
# matched against the whole qualified name, a list of names (exact or dotted suffix), or a
# predicate ``(name, module) -> bool``
LayerSelector = Union[None, str, "re.Pattern[str]", Iterable[str], Callable[[str, nn.Module], bool]]
# what the seed's ``MPTransformerBlock`` accepts per slot: a layer, or a class / factory
# called as ``factory(in_features, out_features)``
LinearSpec = Union[nn.Linear, type, Callable[[int, int], nn.Module], None]


class CrossModalReparameterization(nn.Module):
    """A linear layer with a pathway: x ``(..., i)`` -> ``(..., o)`` =
    ``x @ (weight + cross_modal_scale * aux_weight).T + bias``.

    ``weight`` and ``bias`` are the very parameters of ``original_linear`` (the wrapper takes
    its place in the model); ``aux_weight`` is a copy of ``auxiliary_linear.weight`` (the
    auxiliary model is never modified; its bias is not used, as in the paper);
    ``cross_modal_scale`` is a learnable 0-dim parameter initialised to ``lambda_init``.
    ``aux_trainable=False`` freezes ``aux_weight``.

    ``merge_parameters()`` folds the pathway in place: afterwards the module holds only a
    ``weight`` and a ``bias`` (its state dict is that of a plain ``nn.Linear``) and it returns
    an ``nn.Linear`` sharing those parameters, with identical output.
    """

    def __init__(
        self,
        original_linear: nn.Linear,
        auxiliary_linear: nn.Linear,
        lambda_init: float = 0.0,
        aux_trainable: bool = True,
    ) -> None:
        super().__init__()
        for arg, layer in (("original_linear", original_linear), ("auxiliary_linear", auxiliary_linear)):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{arg}: expected an nn.Linear instance, got {type(layer).__name__}")
        w, w_aux = original_linear.weight, auxiliary_linear.weight
        if w.shape != w_aux.shape:
            raise ValueError(
                "auxiliary_linear: expected a weight of the same shape as original_linear's "
                f"(out, in) = {tuple(w.shape)}, got {tuple(w_aux.shape)}"
            )
        if not isinstance(lambda_init, (int, float)) or not math.isfinite(lambda_init):
            raise ValueError(f"lambda_init: expected a finite number, got {lambda_init!r}")
        self.in_features, self.out_features = original_linear.in_features, original_linear.out_features
        self.weight = w
        self.register_parameter("bias", original_linear.bias)
        aux = w_aux.detach().to(device=w.device, dtype=w.dtype).clone()
        self.aux_weight = nn.Parameter(aux, requires_grad=aux_trainable)
        self.cross_modal_scale = nn.Parameter(torch.tensor(float(lambda_init), device=w.device, dtype=w.dtype))
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        """``weight + cross_modal_scale * aux_weight`` ``(o, i)`` (differentiable)."""
        if self.merged:
            return self.weight
        return self.weight + self.cross_modal_scale * self.aux_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.merged_weight(), self.bias)

    @torch.no_grad()
    def merge_parameters(self) -> nn.Linear:
        """Fold the pathway into ``weight`` (in place; a no-op when already merged) and return
        a plain ``nn.Linear`` sharing this module's ``weight`` and ``bias``.

        The layer the wrapper was built from keeps its own (trained) ``W``, without the pathway.
        """
        if not self.merged:
            merged = self.merged_weight()  # the same expression as the forward: bitwise equal
            self.weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
            del self.aux_weight
            del self.cross_modal_scale
            self.merged = True
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    # the seed package called it ``merge``
    merge = merge_parameters

    def extra_repr(self) -> str:
        state = "merged" if self.merged else f"lambda={self.cross_modal_scale.item():.4g}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {state}"


# ---------------------------------------------------------------------- whole-model helpers
def _is_block_linear(name: str) -> bool:
    """True for a linear inside a repeated block: a numeric path component that is not the last."""
    parts = name.split(".")
    return any(p.isdigit() for p in parts[:-1])


def select_linears(model: nn.Module, layer_names: LayerSelector = None) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers of ``model`` that ``layer_names`` picks, in module order.

    - ``None``: every linear inside a repeated block (a ``ModuleList`` / ``Sequential`` entry),
      i.e. the attention q/k/v (or fused qkv) and output projections and both feed-forward
      linears of each transformer block, as in the paper; heads, poolers and stems are left out.
    - a ``str`` or compiled regex: names that it matches as a whole (``re.fullmatch``).
    - a list of names: each an exact qualified name or a dotted suffix (``"attn.qkv"``); every
      entry must match at least one linear.
    - a callable ``(name, module) -> bool``.

    ``nn.MultiheadAttention.out_proj`` is never picked by default (that module reads its
    weights directly, so a wrapper would be bypassed); naming it explicitly is an error.
    """
    mha_out = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    linears = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    if layer_names is None:
        picked = [(n, m) for n, m in linears if _is_block_linear(n) and id(m) not in mha_out]
        skipped = [n for n, m in linears if _is_block_linear(n) and id(m) in mha_out]
        if skipped:
            logger.warning("add_pathways: skipped %d nn.MultiheadAttention out_proj layer(s), e.g. %s", len(skipped), skipped[0])
        return picked
    if callable(layer_names) and not isinstance(layer_names, (str, re.Pattern)):
        picked = [(n, m) for n, m in linears if layer_names(n, m)]
    elif isinstance(layer_names, (str, re.Pattern)):
        pattern = re.compile(layer_names) if isinstance(layer_names, str) else layer_names
        picked = [(n, m) for n, m in linears if pattern.fullmatch(n)]
    else:
        wanted = list(layer_names)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError(f"layer_names: expected None, a regex, a list of names or a callable, got {layer_names!r}")
        picked = [(n, m) for n, m in linears if any(n == w or n.endswith("." + w) for w in wanted)]
        missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n, _ in picked)]
        if missing:
            raise ValueError(f"layer_names: no nn.Linear in {type(model).__name__} is named or ends with {missing}")
    bad = [n for n, m in picked if id(m) in mha_out]
    if bad:
        raise ValueError(f"layer_names: {bad[0]!r} is the out_proj of an nn.MultiheadAttention, which cannot take a pathway")
    return picked


def add_pathways(
    target: nn.Module,
    auxiliary: nn.Module,
    layer_names: LayerSelector = None,
    lambda_init: float = 0.0,
    *,
    aux_trainable: bool = True,
    pair_by: str = "name",
) -> list[str]:
    """Replace the chosen linears of ``target`` by ``CrossModalReparameterization`` layers whose
    auxiliary weights are the matching linears of ``auxiliary``; return the wrapped names.

    ``layer_names`` picks the target's layers (see ``select_linears``; default: the attention
    and feed-forward linears of every block). ``pair_by="name"`` pairs each with the auxiliary
    linear of the same qualified name (two models of the same class); ``pair_by="order"``
    applies the same selection to ``auxiliary`` and pairs the layers in order (two models of
    the same shape but different naming, e.g. our ``ViT`` and a timm ViT). Every pair is
    checked before anything changes: a missing layer or a shape mismatch is a ``ValueError``
    naming the layer. ``auxiliary`` is not modified (its weights are copied).

    Build the optimizer after this call: the new ``aux_weight`` / ``cross_modal_scale``
    parameters must be in it. Call ``merge_pathways`` before ``save_pretrained`` to get a
    checkpoint that the plain target architecture loads.
    """
    if pair_by not in ("name", "order"):
        raise ValueError(f"pair_by: expected 'name' or 'order', got {pair_by!r}")
    if isinstance(target, CrossModalReparameterization) or isinstance(target, nn.Linear):
        raise TypeError("target: expected a model containing linear layers; wrap a single nn.Linear with CrossModalReparameterization")
    picked = select_linears(target, layer_names)
    if not picked:
        already = sum(isinstance(m, CrossModalReparameterization) for m in target.modules())
        hint = f"; it already has {already} pathway layer(s)" if already else ""
        raise ValueError(f"layer_names: selected no nn.Linear layer in target {type(target).__name__} (selector {layer_names!r}){hint}")
    if pair_by == "name":
        aux_modules = dict(auxiliary.named_modules())
        pairs = []
        for name, layer in picked:
            aux_layer = aux_modules.get(name)
            if not isinstance(aux_layer, nn.Linear):
                found = "nothing" if aux_layer is None else type(aux_layer).__name__
                raise ValueError(
                    f"auxiliary: expected an nn.Linear named {name!r} to pair with the target's, found {found} "
                    "(pair_by='order' pairs layers by position instead)"
                )
            pairs.append((name, layer, name, aux_layer))
    else:
        aux_picked = select_linears(auxiliary, layer_names)
        if len(aux_picked) != len(picked):
            first = picked[len(aux_picked)][0] if len(aux_picked) < len(picked) else aux_picked[len(picked)][0]
            raise ValueError(
                f"auxiliary: selected {len(aux_picked)} linear layers but target {len(picked)}; "
                f"first unpaired layer: {first!r}"
            )
        pairs = [(n, m, an, am) for (n, m), (an, am) in zip(picked, aux_picked)]
    for name, layer, aux_name, aux_layer in pairs:
        if layer.weight.shape != aux_layer.weight.shape:
            raise ValueError(
                f"layer {name!r}: target weight (out, in) = {tuple(layer.weight.shape)} but auxiliary "
                f"{aux_name!r} has {tuple(aux_layer.weight.shape)}"
            )
    wrappers = [
        (name, CrossModalReparameterization(layer, aux_layer, lambda_init, aux_trainable))
        for name, layer, _, aux_layer in pairs
    ]
    for name, wrapper in wrappers:
        _set_submodule(target, name, wrapper)
    logger.info("add_pathways: %d linear layers of %s now have a pathway (lambda_init=%g)", len(wrappers), type(target).__name__, lambda_init)
    return [name for name, _ in wrappers]


def merge_pathways(model: nn.Module) -> nn.Module:
    """Fold every pathway of ``model`` and put a plain ``nn.Linear`` in its place (in place);
    return ``model`` (or the ``nn.Linear`` when ``model`` is itself a pathway layer).
    Outputs are unchanged; the merged model has exactly the target's parameters."""
    if isinstance(model, CrossModalReparameterization):
        return model.merge_parameters()
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, CrossModalReparameterization)]
    plain: dict[int, nn.Linear] = {}
    for name, wrapper in found:
        if id(wrapper) not in plain:
            plain[id(wrapper)] = wrapper.merge_parameters()
        _set_submodule(model, name, plain[id(wrapper)])
    logger.info("merge_pathways: merged %d pathway layer(s) of %s", len(plain), type(model).__name__)
    return model


def pathway_scales(model: nn.Module) -> dict[str, float]:
    """The current ``lambda`` of every unmerged pathway layer, by name (for logging)."""
    return {
        n: float(m.cross_modal_scale.detach())
        for n, m in model.named_modules()
        if isinstance(m, CrossModalReparameterization) and not m.merged
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


# ---------------------------------------------------------------------- the seed's block
class MPTransformerBlock(TransformerBlock):
    """Pre-norm transformer block (the shared ``TransformerBlock``: ``x + attn(norm1 x)``, then
    ``+ ff(norm2 x)``) whose four linears are pathway linears. x ``(b, n, d)`` -> ``(b, n, d)``.

    The seed package's signature; each linear argument is either a layer (used as is, shape
    checked) or a class / factory called as ``factory(in_features, out_features)`` (e.g.
    ``nn.Linear``) that builds a fresh one. Mapping to the block's layers, with ``inner =
    heads * dim_head`` and ``hidden = int(ff_mult * dim)``:

    - ``original_linear`` / ``auxiliar_linear``: the attention output projection
      ``attn.to_out``, weight ``(d, inner)``. (The seed applied this one pair to q, k, v and
      the output alike; here the fused q/k/v projection has its own pair, below.)
    - ``qkv_original_linear`` / ``qkv_auxiliar_linear`` (keyword-only, default fresh):
      the fused q/k/v projection ``attn.to_qkv``, weight ``(3 * inner, d)``.
    - ``ffn_original_linear`` / ``ffn_auxiliar_linear``: the first feed-forward linear
      ``ff.proj_in``, weight ``(hidden, d)`` (``(2 * hidden, d)`` with ``activation="swiglu"``).
    - ``ffn_original_last_linear`` / ``ffn_aux_last_linear``: the last one, ``ff.proj_out``,
      weight ``(d, hidden)``.

    ``merge_parameters()`` folds all four in place, leaving a plain ``TransformerBlock``'s
    layers (its state dict loads into one).
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        ff_mult: float = 4.0,
        original_linear: LinearSpec = nn.Linear,
        auxiliar_linear: LinearSpec = nn.Linear,
        ffn_original_linear: LinearSpec = nn.Linear,
        ffn_auxiliar_linear: LinearSpec = nn.Linear,
        ffn_original_last_linear: LinearSpec = nn.Linear,
        ffn_aux_last_linear: LinearSpec = nn.Linear,
        *,
        qkv_original_linear: LinearSpec = nn.Linear,
        qkv_auxiliar_linear: LinearSpec = nn.Linear,
        lambda_init: float = 0.0,
        aux_trainable: bool = True,
        activation: str = "gelu",
        norm: str = "layernorm",
        bias: bool = True,
    ) -> None:
        for arg, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}: expected a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        super().__init__(
            dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, activation=activation,
            norm=norm, rotary=False, bias=bias, dropout=dropout,
        )
        self.dim = dim
        slots = (
            (self.attn, "to_qkv", "qkv_original_linear", qkv_original_linear, "qkv_auxiliar_linear", qkv_auxiliar_linear),
            (self.attn, "to_out", "original_linear", original_linear, "auxiliar_linear", auxiliar_linear),
            (self.ff, "proj_in", "ffn_original_linear", ffn_original_linear, "ffn_auxiliar_linear", ffn_auxiliar_linear),
            (self.ff, "proj_out", "ffn_original_last_linear", ffn_original_last_linear, "ffn_aux_last_linear", ffn_aux_last_linear),
        )
        for parent, attr, orig_arg, orig, aux_arg, aux in slots:
            like = getattr(parent, attr)
            target = _resolve_linear(orig_arg, orig, like, bias)
            auxiliary = _resolve_linear(aux_arg, aux, like, bias)
            setattr(parent, attr, CrossModalReparameterization(target, auxiliary, lambda_init, aux_trainable))

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """x ``(b, n, d)``; keyword arguments (``causal``, ``mask``) as ``TransformerBlock``."""
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x: expected a float tensor (batch, tokens, {self.dim}), got {got}")
        return super().forward(x, **kwargs)

    def merge_parameters(self) -> "MPTransformerBlock":
        """Fold every pathway into a plain ``nn.Linear`` (in place); return ``self``."""
        merge_pathways(self)
        return self


def _resolve_linear(arg: str, spec: LinearSpec, like: nn.Linear, bias: bool) -> nn.Linear:
    """A layer for one ``MPTransformerBlock`` slot shaped like ``like``."""
    in_f, out_f = like.in_features, like.out_features
    if spec is None:
        spec = nn.Linear
    if isinstance(spec, nn.Module):
        layer = spec
    elif isinstance(spec, type) and issubclass(spec, nn.Linear):
        layer = spec(in_f, out_f, bias=bias)
    elif callable(spec):
        layer = spec(in_f, out_f)
    else:
        raise TypeError(f"{arg}: expected an nn.Linear, a class or a factory (in_features, out_features), got {spec!r}")
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{arg}: expected an nn.Linear (or a factory returning one), got {type(layer).__name__}")
    if tuple(layer.weight.shape) != (out_f, in_f):
        raise ValueError(
            f"{arg}: expected a linear with weight (out, in) = {(out_f, in_f)} "
            f"(in_features={in_f}, out_features={out_f}), got {tuple(layer.weight.shape)}"
        )
    return layer

"""The model under evaluation, whatever it was loaded from, behind one small interface.

:func:`load_eval_model` loads a source with :func:`mammut.load` (a run folder, a mammut
checkpoint folder, a converted open_clip CoCa or openMaMMUT file, a local Hugging Face
snapshot) and wraps the ``(model, preprocess, tokenizer)`` it gets in an :class:`EvalModel`:
no-grad embedding and generation of batches on the chosen device through
:class:`mammut.Embedder`, with bf16 autocast where chosen (``precision``: ``auto`` picks it
only where the device runs bf16 natively, :mod:`mammut.precision`).

A run folder trained with ``train.task: vqa`` keeps the prompt format it was trained on
(``BOS [<image>] question "answer:"``, :class:`mammut.data.vqa.VqaEncoder`) for VQA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..constants import MEDIA_TOKEN
from ..embedder import Embedder
from ..models.contract import MediaDecoder
from ..precision import Precision

log = logging.getLogger(__name__)

__all__ = ["EvalModel", "load_eval_model", "default_device"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EvalModel:
    """A loaded model with its image transform and tokenizer, on ``device``.

    ``preprocess(pil_image) -> (3, H, W)``; ``tokenizer(texts) -> (b, n)`` ids and
    ``tokenizer.decode(ids) -> list[str]``; ``vqa_encoder``: the prompt encoder of a run
    fine-tuned for VQA (None otherwise)."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Any
    source: str = ""
    device: torch.device = torch.device("cpu")
    bf16: bool = False
    vqa_encoder: Any = None
    precision_reason: str = ""

    def embedder(self) -> Embedder:
        """The :class:`mammut.Embedder` that embeds and generates for this model (built from the
        current fields: ``bf16`` set after construction counts)."""
        name = "bf16" if self.bf16 else "fp32"
        precision = Precision(name, name, self.precision_reason or f"{name} chosen")
        return Embedder(self.model, self.preprocess, self.tokenizer, device=self.device, precision=precision)

    # what the model can do: the Embedder's answers (the Protocols of mammut.models.contract)
    contrastive = property(lambda self: self.embedder().contrastive, doc="``embed_image`` and ``embed_text``.")
    captioner = property(lambda self: self.embedder().captioner, doc="``generate``.")
    media = property(lambda self: self.embedder().media, doc="A media model (Flamingo).")

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def require(self, what: str, task: str) -> None:
        """A ``ValueError`` naming the source unless the model can ``what`` ("embed" / "generate")."""
        ok = self.contrastive if what == "embed" else self.captioner
        need = "a contrastive model (embed_image / embed_text)" if what == "embed" else "a captioning model (generate)"
        if not ok:
            raise ValueError(f"SOURCE: mammut eval {task} needs {need}, got {self.name} from {self.source}")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.embedder().autocast()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(b, l)``, float32 on the CPU (one model call)."""
        return self.embedder().embed_images(images, batch_size=max(1, len(images)))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.embedder().tokenize(texts)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings ``(n, l)`` (texts longer than the context are cut)."""
        return self.embedder().embed_texts(list(texts), batch_size=batch_size)

    def prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text as a decoding prompt: its ids with the start token, without end token or padding."""
        rows = self.tokenize(texts).tolist()
        eos, pad = getattr(self.tokenizer, "eos_id", None), getattr(self.tokenizer, "pad_id", 0)
        out = []
        for row in rows:
            if eos is not None and eos in row[1:]:
                row = row[:row.index(eos, 1)]
            while row and row[-1] == pad:
                row = row[:-1]
            out.append(row)
        return out

    def media_prompt(self, n: int) -> list[list[int]] | None:
        """``[bos, <image>]`` per row for a media model, else None (the model's start token)."""
        if not isinstance(self.model, MediaDecoder):
            return None
        return [[self.model.config.bos_id, self.model.media_token_id]] * n

    def generate(self, images: torch.Tensor, prompts: list[list[int]] | None = None, **options: Any) -> list[str]:
        """Decoded generations for ``images`` (``options``: ``GenerationConfig`` fields), one
        model call; a media model gets ``[bos, <image>]`` prompts by default."""
        texts = self.embedder().caption(images, prompts, batch_size=max(1, len(images)), **options)
        return [t.strip() for t in texts]


# ----------------------------------------------------------------------------- loading


def _run_vqa_encoder(source: Path, tokenizer: Any) -> Any:
    """The VQA prompt encoder of a run folder trained with ``train.task: vqa`` (else None)."""
    from ..runs import read_run_config

    if not (source / "config.yaml").is_file():
        return None
    cfg = read_run_config(source)
    if (cfg.get("train") or {}).get("task") != "vqa":
        return None
    from ..models import get_model_spec
    from ..data.vqa import VqaEncoder
    from ..tokenizer import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(source / "tokenizer.json")
    media_id = tok.special_id(MEDIA_TOKEN) if "media_sequence" in get_model_spec(cfg["model"]["name"]).inputs else None
    return VqaEncoder(tok, media_id)


def load_eval_model(source: str | Path, *, device: str | torch.device | None = None, checkpoint: str | None = None,
                    bf16: bool = False, precision: str | None = None) -> EvalModel:
    """Load ``source`` with :func:`mammut.load` for evaluation (eval mode, on ``device``;
    default CUDA when present). ``precision``: ``auto`` | ``fp32`` | ``bf16`` (default: bf16
    when ``bf16`` is set, else fp32). A source without its preprocessing or tokenizer is a
    ``ValueError`` saying which."""
    from ..loading import MissingComponent, load
    from ..precision import resolve_precision

    try:
        dev = torch.device(device or default_device())
    except RuntimeError as exc:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device of this machine, got {device!r} (CUDA is not available)")
    chosen = resolve_precision(precision or ("bf16" if bf16 else "fp32"), dev)
    model, preprocess, tokenizer = load(source, device=dev, checkpoint=checkpoint)
    for part in (preprocess, tokenizer):
        if isinstance(part, MissingComponent):  # the source was saved without it
            raise ValueError(f"SOURCE: {part.what}: {part.reason}")
    src = Path(source).expanduser()
    vqa = _run_vqa_encoder(src, tokenizer) if src.is_dir() else None
    log.info("evaluating %s (%s) on %s in %s (%s)", source, type(model).__name__, dev, chosen.name, chosen.reason)
    return EvalModel(model.eval(), preprocess, tokenizer, str(source), dev, chosen.bf16, vqa, chosen.reason)

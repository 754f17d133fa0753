"""``detection``: open-vocabulary detection fine-tuning (OWL-ViT's recipe on MaMMUT, as the paper).

Model: ``mammut_detector`` (:mod:`mammut.models.detector`), normally started from a pretraining
run (``train.init_from RUN``): :meth:`Detection.init_model_section` takes the source's MaMMUT
architecture, names it ``mammut_detector`` with this run's head settings, and raises the ViT to
``data.image_size`` (detection at a higher resolution than pretraining) with the full-image
positional embedding (``cropped_pos_emb`` off: RO-ViT's CPE is a *pretraining* device);
:meth:`Detection.adapt_init_state` upsamples the source's positional grid
(``mammut.encoders.vit.resample_pos_grid``: bicubic) and leaves the new head (``head.*``) at its
initialisation. CPE on / off is thus an ablation of the *pretraining* run.

Data (``data.kind``): ``emoji`` = emoji detection scenes (:class:`mammut.data.detection.DetectionScenes`
with the run's ``data.num_emoji`` / ``vocab_seed`` / ``image_size`` and this task's
``task_options``); ``coco_detection`` = a COCO instances JSON (``data.path``, images under
``data.image_root``), ``task_options.novel`` naming its novel categories (default: the OV-COCO
17 that it has). Novel classes are never targets and never queries in training: each step's
queries are the prompts (``task_options.prompt``, ``"a {}"``) of every base class, embedded by
the model's own text side (frozen unless ``task_options.train_text``); with the closed-vocabulary
baseline (``model.num_classes`` > 0) the queries are learned class embeddings instead.

Loss per image (DETR / OWL-ViT): every target is matched to one token by
``scipy.optimize.linear_sum_assignment`` on ``cost_class * focal cost + cost_l1 * L1(cxcywh)
+ cost_giou * (-gIoU)``; then ``torchvision.ops.sigmoid_focal_loss`` over every token x base
query (the matched token's target class is 1, everything else 0), L1 on the matched boxes
(x0, y0, x1, y1) and ``torchvision.ops.generalized_box_iou_loss``, each summed over the
micro-batch and divided by its number of targets. Optional (``task_options.loss_softmax`` > 0):
a softmax cross-entropy over the step's queries for each matched token (cosines times the
pretrained contrastive temperature, :func:`class_softmax`); evaluation then scores each pair
``sigmoid(logit) * softmax``.

Evaluation: the first ``eval.n`` held-out emoji detection scenes (another random stream;
base and novel emoji, all labelled), every class as a query, the 100 best (token, class)
pairs per image after per-class NMS (``task_options.nms``, IoU 0.5), scored by pycocotools'
COCOeval: AP / AP50 / AP75 over all, base and novel classes (:mod:`mammut.eval.detection`),
with a figure of true and predicted boxes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..models.contract import Batch
from .base import Task, register_task

__all__ = ["Detection", "DetectionOptions", "match", "detection_losses", "class_softmax", "require_scipy"]

log = logging.getLogger(__name__)

HELDOUT_SEED = 0  # held-out scenes: the same for every run
_QUICK_N = 64


@dataclass
class DetectionOptions:
    """The ``task_options:`` section of a detection run."""

    min_objects: int = 1  # emoji per scene
    max_objects: int = 4
    size_range: tuple[float, float] = (0.12, 0.4)  # emoji side, share of the image side
    max_overlap: float = 0.3  # most IoU between two emoji of a scene
    # emoji scenes are drawn at this size and resized to data.image_size (null: drawn at data.image_size): the
    # detector may read a scene at a higher resolution than the scene's own
    scene_size: int | None = None
    novel_every: int = 5  # emoji ids novel_every-1, 2*novel_every-1, ... are novel classes
    novel_in_train: str = "background"  # background: novel emoji appear unlabelled in training | absent
    novel: tuple[str, ...] | None = None  # coco_detection: novel category names (null: the OV-COCO 17 it has)
    prompt: str = "a {}"  # a class name as a text query
    train_text: bool = False  # train the text side through the queries (OWL-ViT: a 25x smaller lr; here frozen)
    focal_alpha: float = 0.3
    focal_gamma: float = 2.0
    # matching cost and loss weights: DETR's 1 / 5 / 2 (OWL-ViT's scenic config: 1 / 1 / 1); on the demo
    # run, 400 steps at 96 px: novel AP50 0.146 / base 0.199 with these and box pooling, 0.119 / 0.156 with
    # 1 / 1 / 1 and the lone token's class embedding
    cost_class: float = 1.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    loss_class: float = 1.0
    loss_l1: float = 5.0
    loss_giou: float = 2.0
    # > 0: add this weight times a softmax cross-entropy over the step's queries for each matched token
    # (its class embedding's cosine to every query, times the pretrained contrastive temperature: the
    # pretraining's own objective, ViLD's text-embedding head), so that a box names its one class among many
    loss_softmax: float = 0.0
    max_detections: int = 100  # per image, at evaluation
    # evaluation: per-class NMS IoU of the (token, class) pairs before the max_detections best are kept (null or
    # 1: none, OWL-ViT's text path); on the 2,629-step run, 512 held-out scenes: novel AP50 0.199 -> 0.237
    nms: float | None = 0.5
    # evaluation: box voting, each detection's box the mean of the image's token boxes overlapping it at this IoU,
    # weighted by each token's best score squared (null or 0: the token's own box); mammut.eval.detection.vote_boxes
    box_vote: float | None = 0.3
    # evaluation of a detector with a frozen pretrained image tower (model.region_size > 0): re-score each image's
    # best rescore_proposals boxes with it (0: off), detector^(1 - a) * region^a with a = rescore_alpha[0] for the
    # base classes and rescore_alpha[1] for the novel ones (F-VLM's alpha / beta); mammut.eval.detection.Rescore
    rescore_proposals: int = 10
    rescore_alpha: tuple[float, float] = (0.35, 0.65)
    # the other proposals scoring at least this are painted out of each crop before the tower names it (null: never)
    rescore_hide_others: float | None = 0.15

    def __post_init__(self) -> None:
        from ..data.detection import NOVEL_IN_TRAIN

        if self.novel_in_train not in NOVEL_IN_TRAIN:
            raise ValueError(f"task_options.novel_in_train: expected one of {NOVEL_IN_TRAIN}, got {self.novel_in_train!r}")
        if "{}" not in self.prompt:
            raise ValueError(f"task_options.prompt: expected a template with '{{}}' for the class name, got {self.prompt!r}")
        if self.max_detections < 1:
            raise ValueError(f"task_options.max_detections: expected >= 1, got {self.max_detections}")
        from ..eval.detection import check_box_vote, check_nms

        self.nms = check_nms(self.nms, "task_options.nms")
        self.box_vote = check_box_vote(self.box_vote, "task_options.box_vote")
        if self.rescore_proposals < 0:
            raise ValueError(f"task_options.rescore_proposals: expected >= 0 (0: off), got {self.rescore_proposals}")
        if len(self.rescore_alpha) != 2 or not all(0.0 <= float(a) <= 1.0 for a in self.rescore_alpha):
            raise ValueError(f"task_options.rescore_alpha: expected [base, novel] weights in [0, 1], got {self.rescore_alpha}")
        self.rescore_alpha = (float(self.rescore_alpha[0]), float(self.rescore_alpha[1]))
        if self.rescore_hide_others is not None and not 0.0 <= self.rescore_hide_others <= 1.0:
            raise ValueError(f"task_options.rescore_hide_others: expected a score in [0, 1] or null (never), "
                             f"got {self.rescore_hide_others}")
        if self.loss_softmax < 0:
            raise ValueError(f"task_options.loss_softmax: expected >= 0 (0: off), got {self.loss_softmax}")


def require_scipy() -> Any:
    """``scipy.optimize.linear_sum_assignment``, or an ImportError naming the extra."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:
        raise ImportError(f"detection training needs scipy ({exc}): pip install \"mammut-vl[detection]\"") from None
    return linear_sum_assignment


# ---------------------------------------------------------------------------- matching and losses


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor, target_labels: torch.Tensor, *,
          alpha: float = 0.3, gamma: float = 2.0, cost_class: float = 1.0, cost_l1: float = 1.0,
          cost_giou: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching of one image: ``logits`` ``(m, q)``, ``boxes`` ``(m, 4)`` cxcywh,
    targets ``(k, 4)`` xyxy and ``(k,)`` query indices -> ``(token indices (k,), target
    indices (k,))``. Cost: focal class cost (DETR's), L1 on cxcywh, minus gIoU."""
    from torchvision.ops import box_convert, generalized_box_iou

    linear_sum_assignment = require_scipy()
    if len(target_labels) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    p = torch.sigmoid(logits[:, target_labels].float())
    neg = (1 - alpha) * p.pow(gamma) * -torch.log1p(-p + 1e-8)
    pos = alpha * (1 - p).pow(gamma) * -torch.log(p + 1e-8)
    c_class = pos - neg
    c_l1 = torch.cdist(boxes.float(), box_convert(target_boxes.float(), "xyxy", "cxcywh"), p=1)
    c_giou = -generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"), target_boxes.float())
    cost = cost_class * c_class + cost_l1 * c_l1 + cost_giou * c_giou
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def detection_losses(out: dict[str, torch.Tensor], target_boxes: list[torch.Tensor], target_labels: list[torch.Tensor],
                     opt: DetectionOptions, *, num_targets: torch.Tensor | None = None,
                     queries: torch.Tensor | None = None, softmax_scale: float | torch.Tensor = 1 / 0.07
                     ) -> dict[str, torch.Tensor]:
    """The matched losses of a micro-batch (see the module docstring): ``{"loss", "class",
    "l1", "giou"}`` (and ``"softmax"`` with ``opt.loss_softmax``); ``out``: the detector's
    ``{"logits" (b, m, q), "boxes" (b, m, 4)}`` (and ``"class_embeds" (b, m, l)`` for the
    softmax term, with ``queries`` ``(q, l)`` normalised and its temperature ``softmax_scale``).
    Each is a sum over the micro-batch divided by ``num_targets`` (default: its own number of
    targets; the task passes the step's, see ``Detection.prepare_step``)."""
    from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

    logits, boxes = out["logits"].float(), out["boxes"].float()
    targets = torch.zeros_like(logits)
    pred, true, matched, classes = [], [], [], []
    for i, (tb, tl) in enumerate(zip(target_boxes, target_labels)):
        rows, cols = match(logits[i].detach(), boxes[i].detach(), tb, tl, alpha=opt.focal_alpha, gamma=opt.focal_gamma,
                           cost_class=opt.cost_class, cost_l1=opt.cost_l1, cost_giou=opt.cost_giou)
        rows, cols = rows.to(logits.device), cols.to(logits.device)
        targets[i, rows, tl[cols]] = 1.0
        pred.append(boxes[i, rows])
        true.append(tb[cols].float())
        matched.append((i, rows))
        classes.append(tl[cols].to(logits.device))
    n = num_targets.to(logits.device) if num_targets is not None else max(sum(len(t) for t in target_labels), 1)
    cls = sigmoid_focal_loss(logits, targets, alpha=opt.focal_alpha, gamma=opt.focal_gamma, reduction="sum") / n
    p = box_convert(torch.cat(pred), "cxcywh", "xyxy") if pred else boxes.new_zeros(0, 4)
    t = torch.cat(true) if true else boxes.new_zeros(0, 4)
    l1 = (p - t).abs().sum() / n
    giou = generalized_box_iou_loss(p, t, reduction="sum") / n if len(p) else p.sum()
    loss = opt.loss_class * cls + opt.loss_l1 * l1 + opt.loss_giou * giou
    losses = {"class": cls.detach(), "l1": l1.detach(), "giou": giou.detach()}
    if opt.loss_softmax > 0:
        if queries is None or queries.ndim != 2 or "class_embeds" not in out:
            raise ValueError("task_options.loss_softmax: expected the queries (q, l) and the detector's class_embeds")
        emb = torch.cat([out["class_embeds"][i, rows] for i, rows in matched]).float() if matched else logits.new_zeros(0, 1)
        if len(emb):
            sim = softmax_scale * emb @ queries.float().t()
            soft = torch.nn.functional.cross_entropy(sim, torch.cat(classes), reduction="sum") / n
        else:
            soft = logits.sum() * 0.0
        loss = loss + opt.loss_softmax * soft
        losses["softmax"] = soft.detach()
    return {"loss": loss, **losses}


def class_softmax(model: nn.Module, opt: DetectionOptions) -> float | None:
    """The temperature of the ``loss_softmax`` term and of its scoring at evaluation
    (:func:`mammut.eval.detection.predict`'s ``class_softmax``): the model's pretrained contrastive
    temperature, fixed (1 / 0.07 without one); None when ``opt.loss_softmax`` is 0."""
    if opt.loss_softmax <= 0:
        return None
    core = getattr(model, "module", model)  # DDP / FSDP wrappers
    scale = getattr(getattr(core, "contrastive", None), "logit_scale", None)
    return float(scale().detach()) if callable(scale) else 1 / 0.07


# ---------------------------------------------------------------------------- data


class _Collate:
    """Detection items -> a batch with the labels as query indices (``label_to_query``) and the
    step's query token ids (None: the model's learned classes)."""

    def __init__(self, label_to_query: dict[int, int], queries: torch.Tensor | None) -> None:
        self.map, self.queries = label_to_query, queries

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        from ..data.detection import collate_detection

        batch = collate_detection(items)
        labels, boxes = [], []
        for b, lab in zip(batch["boxes"], batch["labels"]):
            keep = torch.tensor([int(v) in self.map for v in lab.tolist()], dtype=torch.bool)
            if not bool(keep.all()):  # a novel class in training data: never a target (the dataset drops them)
                raise ValueError("detection: a novel class reached the training targets")
            labels.append(torch.tensor([self.map[int(v)] for v in lab.tolist()], dtype=torch.long))
            boxes.append(b)
        batch["labels"], batch["boxes"] = labels, boxes
        if self.queries is not None:
            batch["queries"] = self.queries
        return batch


class _CocoTrainSource:
    """COCO images for training: global sample ``i`` is image ``perm_epoch[i % n]``, novel
    classes' boxes removed (never targets); an unreadable image is replaced by the next one of
    the permutation, and counted (logged)."""

    def __init__(self, ds: Any, seed: int) -> None:
        if len(ds) == 0:
            raise ValueError(f"data.path: {ds.path} lists no images")
        self.ds, self.seed = ds, seed
        self.novel = set(ds.novel_ids)
        self.unreadable: set[int] = set()

    def __call__(self, i: int) -> dict[str, Any]:
        n = len(self.ds)
        epoch, j = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        for step in range(n):
            index = int(perm[(j + step) % n])
            try:
                item = self.ds[index]
                break
            except OSError as exc:
                if index not in self.unreadable:
                    self.unreadable.add(index)
                    log.warning("detection: image %s unreadable, skipped (%d so far): %s",
                                self.ds.images[index]["file_name"], len(self.unreadable), exc)
        else:
            raise ValueError(f"data.image_root: none of the {n} images of {self.ds.path} could be read")
        keep = torch.tensor([int(v) not in self.novel for v in item["labels"].tolist()], dtype=torch.bool)
        return {**item, "boxes": item["boxes"][keep], "labels": item["labels"][keep]}


def _coco_check(cfg: Any) -> None:
    from pathlib import Path

    if not cfg.path or not Path(cfg.path).is_file():
        raise FileNotFoundError(f"data.path: expected a COCO instances JSON, got {cfg.path!r}")
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        raise FileNotFoundError(f"data.image_root: no such folder {cfg.image_root}")


def _not_a_pair_reader(cfg: Any, tokenizer: Any, **steps: Any) -> Any:
    raise ValueError("data.kind: 'coco_detection' is read by train.task='detection' only")


def _register_kinds() -> None:
    from ..train.data import register_data_kind

    register_data_kind("coco_detection", _not_a_pair_reader, needs_path=True, check=_coco_check,
                       corpus=lambda cfg: [])


_register_kinds()


# ---------------------------------------------------------------------------- the task


@register_task
class Detection(Task):
    """Open-vocabulary detection fine-tuning and COCO-AP evaluation (see the module docstring)."""

    name = "detection"
    data_kinds = ("emoji", "coco_detection")
    options = DetectionOptions
    unused_parameters = True  # the decoder gets no gradient (frozen text side; no captioning)
    heldout_seed = HELDOUT_SEED

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.opt: DetectionOptions = cfg.task_options if cfg.task_options is not None else DetectionOptions()
        self._heldout: dict[int, list[dict[str, Any]]] = {}
        self._query_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------- starting from a pretraining run
    @classmethod
    def init_model_section(cls, cfg: Any, model: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        from ..models.detector import HEAD_FIELDS
        from ..train.config import ConfigError
        from ..train.task import FINE_TUNE_KEYS

        if source.get("name") not in ("mammut", "mammut_detector"):
            raise ConfigError(f"train.init_from: the detection task starts from a 'mammut' run, got a "
                              f"{source.get('name')!r} model")
        if model.get("name") != "mammut_detector":
            raise ConfigError(f"model.name: expected 'mammut_detector' for train.task='detection', got {model.get('name')!r}")
        if not isinstance(source.get("vit"), dict):
            raise ConfigError("train.init_from: the detection task needs the source's built-in ViT (model.vit), got "
                              f"encoder={source.get('encoder')!r}")
        out = {k: v for k, v in source.items() if k not in HEAD_FIELDS or source.get("name") == "mammut_detector"}
        out["name"] = "mammut_detector"
        for k in (*FINE_TUNE_KEYS, *HEAD_FIELDS):
            if k in model:
                out[k] = model[k]
        # detection at data.image_size with the full-image positional embedding (RO-ViT: CPE is for pretraining)
        out["vit"] = {**source["vit"], "image_size": cfg.data.image_size, "cropped_pos_emb": False, "patch_dropout": 0.0}
        log.info("detection: %s's MaMMUT at %d px (pretrained at %s px) with detection heads", cfg.train.init_from,
                 cfg.data.image_size, source["vit"].get("image_size"))
        return out

    def adapt_init_state(self, state: dict[str, torch.Tensor],
                         model: nn.Module) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        from ..encoders.vit import resample_pos_grid

        from ..models.detector import REGION_KEYS

        state = dict(state)
        target = model.state_dict()
        if any(k.startswith("region.") for k in target) and not any(k.startswith("region.") for k in state):
            # the frozen region tower: a copy of the source's image tower as pretraining left it
            for k, v in list(state.items()):
                for src, dst in REGION_KEYS.items():
                    if k.startswith(src) and dst + k[len(src):] in target:
                        state[dst + k[len(src):]] = v.clone()
        for key in ("img_encoder.pos_emb", "region.encoder.pos_emb"):
            if key in state and key in target and state[key].shape != target[key].shape:
                state[key] = resample_pos_grid(state[key], tuple(target[key].shape[-2:]))
        return state, ("head.",)

    # ---------------------------------------------------------------- data
    def dataset(self, split: str, seed: int) -> Any:
        """Emoji detection scenes of ``split``, or the COCO instances file (``coco_detection``)."""
        d = self.cfg.data
        if d.kind == "coco_detection":
            from ..data.detection import OV_COCO_NOVEL, CocoInstances

            probe = CocoInstances(d.path, d.image_root, image_size=d.image_size, key="data.path")
            novel = self.opt.novel if self.opt.novel is not None else [n for n in OV_COCO_NOVEL if n in probe.class_names()]
            return CocoInstances(d.path, d.image_root, novel=novel, image_size=d.image_size, key="data.path")
        from ..data.detection import DetectionScenes

        o = self.opt
        return DetectionScenes(d.image_size, d.num_emoji, split=split, seed=seed, vocab_seed=d.vocab_seed,
                               min_objects=o.min_objects, max_objects=o.max_objects, size_range=o.size_range,
                               max_overlap=o.max_overlap, novel_every=o.novel_every, novel_in_train=o.novel_in_train,
                               render_size=o.scene_size)

    def tokenizer_corpus(self) -> list[str]:
        ds = self.dataset("train", 0)
        return [self.opt.prompt.format(n) for n in ds.class_names()]

    def _closed(self) -> bool:
        return int(self.cfg.model.get("num_classes") or 0) > 0

    def queries(self, tokenizer: Any, names: list[str]) -> torch.Tensor:
        """Token ids ``(q, max_len)`` of the prompts of ``names``."""
        return tokenizer([self.opt.prompt.format(n) for n in names], self.cfg.data.max_len)

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Any:
        from ..train.config import ConfigError
        from ..train.data import MicroBatches, indexed_batches

        t = self.cfg.train
        if int(self.cfg.model.get("region_size") or 0) and not t.init_from:
            raise ConfigError(f"model.region_size: {self.cfg.model['region_size']} keeps a frozen copy of a pretrained "
                              "image tower, expected train.init_from (a pretraining run to copy it from), got none")
        if not t.init_from and start_step == 0:
            log.info("detection: training from scratch (pass --train.init_from RUN to start from a pretraining run)")
        ds = self.dataset("train", t.seed)
        names = ds.class_names()
        base = list(ds.base_ids)
        if self._closed():
            if int(self.cfg.model["num_classes"]) != len(base):
                raise ConfigError(f"model.num_classes: expected the {len(base)} base classes of the data, "
                                  f"got {self.cfg.model['num_classes']}")
            queries = None
        else:
            queries = self.queries(tokenizer, [names[i] for i in base])
        source = _CocoTrainSource(ds, t.seed) if self.cfg.data.kind == "coco_detection" else ds.__getitem__
        collate = _Collate({c: j for j, c in enumerate(base)}, queries)
        micro = MicroBatches(source, collate, t.batch_size, t.grad_accum, rank, world_size)  # type: ignore[arg-type]
        return indexed_batches(micro, self.cfg.data.num_workers, start_step, t.steps)

    def prepare_step(self, micro_batches: list[Batch], pad_id: int | None) -> None:
        """``batch["num_targets"]``: the step's number of targets over every micro-batch and rank,
        over ``world * n_micro`` (one small all-reduce), so that the losses (sums over each
        micro-batch divided by it), averaged over micro-batches and ranks, are the sums over the
        whole step divided by its number of targets: the same whatever the split (DETR's
        all-reduced ``num_boxes``)."""
        import torch.distributed as dist

        total = torch.tensor(float(sum(len(lab) for b in micro_batches for lab in b["labels"])), dtype=torch.float64)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            total = total.to(device)
            dist.all_reduce(total)
            total = total.cpu()
        norm = (total / (world * len(micro_batches))).clamp(min=1e-6).to(torch.float32)
        for b in micro_batches:
            b["num_targets"] = norm

    # ---------------------------------------------------------------- training
    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        queries = batch.get("queries")
        if queries is not None:
            if self.opt.train_text:
                q = model.query_embeds(queries)
            else:  # a frozen text side: the same query embeddings every step, computed once
                key = (queries.device, tuple(queries.shape), torch.is_autocast_enabled(queries.device.type))
                cached = self._query_cache.get(key)
                if cached is None or not torch.equal(cached[0], queries):
                    with torch.no_grad():
                        cached = (queries.clone(), model.query_embeds(queries))
                    self._query_cache = {key: cached}
                q = cached[1]
        else:
            q = model.query_embeds(None)
        out = model.detect(batch["images"], q)
        return detection_losses(out, batch["boxes"], batch["labels"], self.opt, num_targets=batch.get("num_targets"),
                                queries=q, softmax_scale=class_softmax(model, self.opt) or 1 / 0.07)

    # ---------------------------------------------------------------- evaluation
    def heldout(self, n: int) -> list[dict[str, Any]]:
        if n not in self._heldout:
            ds = self.dataset("heldout", HELDOUT_SEED)
            self._heldout[n] = [ds[i] for i in range(n)]
        return self._heldout[n]

    def run_eval(self, model: nn.Module, tokenizer: Any, items: list[dict[str, Any]], names: list[str],
                 base: list[int], novel: list[int]) -> tuple[dict[str, Any], list[Any]]:
        """COCO AP of ``model`` on ``items`` (emoji detection items) and its detections."""
        from ..eval.detection import coco_ap, emoji_ground_truth, predict, to_coco_results

        images = torch.stack([it["image"] for it in items])
        soft = class_softmax(model, self.opt)
        if self._closed():  # learned queries of the base classes only: novel classes cannot be scored
            dets = predict(model, images, None, batch_size=self.cfg.eval.batch_size,
                           max_detections=self.opt.max_detections, nms=self.opt.nms, class_softmax=soft,
                           box_vote=self.opt.box_vote)
            categories = base
        else:
            dets = predict(model, images, self.queries(tokenizer, names), batch_size=self.cfg.eval.batch_size,
                           max_detections=self.opt.max_detections, nms=self.opt.nms, class_softmax=soft,
                           box_vote=self.opt.box_vote, rescore=self.rescore(model), seen=base)
            categories = list(range(len(names)))
        size = self.cfg.data.image_size
        results = to_coco_results([it["image_id"] for it in items], dets, categories, [size] * len(items))
        ap = coco_ap(emoji_ground_truth(items, names, size), results, base, novel)
        return ap, dets

    def rescore(self, model: nn.Module) -> Any:
        """The evaluation's :class:`mammut.eval.detection.Rescore` (``task_options.rescore_*``), or
        None: a detector without a frozen pretrained image tower (``model.region_size: 0``) or
        ``rescore_proposals: 0``."""
        from ..eval.detection import Rescore

        core = getattr(model, "module", model)
        if getattr(core, "region", None) is None or self.opt.rescore_proposals == 0:
            return None
        return Rescore.from_task_options(asdict(self.opt))

    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        from ..eval.detection import detection_table, plot_detections, top_box_recall
        from ..eval.report import Figure, RunReport

        if data is not None:
            raise ValueError(f"--data: a detection run is scored on its held-out emoji detection scenes; for a COCO "
                             f"instances file use `mammut eval detection RUN --data FILE --images DIR`, got {data!r}")
        if self.cfg.data.kind != "emoji":
            raise ValueError("data.kind: a coco_detection run is scored with `mammut eval detection RUN --data "
                             "instances.json --images DIR --novel ...` (no held-out split of its own)")
        n = self.cfg.eval.n if n is None else n
        ds = self.dataset("heldout", HELDOUT_SEED)
        names, base, novel = ds.class_names(), list(ds.base_ids), list(ds.novel_ids)
        items = self.heldout(n)
        ap, dets = self.run_eval(model, tokenizer, items, names, base, novel)
        soft_scale = class_softmax(model, self.opt)
        if not self._closed():  # the probe's measure: is the top box of a novel emoji's own query on it?
            ap["novel_top_box_recall"] = top_box_recall(model, torch.stack([it["image"] for it in items]),
                                                        self.queries(tokenizer, names), items, novel,
                                                        batch_size=self.cfg.eval.batch_size)
        rescore = None if self._closed() else self.rescore(model)
        ap.update({"closed_vocabulary": self._closed(), "init_from": self.cfg.train.init_from,
                   "rescore": None if rescore is None else {"proposals": rescore.proposals, "alpha_base": rescore.alpha_seen,
                                                            "alpha_novel": rescore.alpha_unseen,
                                                            "scales": list(rescore.scales),
                                                            "hide_others": rescore.hide_others},
                   "novel_in_train": self.opt.novel_in_train, "n_base": len(base), "n_novel": len(novel),
                   "nms": self.opt.nms, "box_vote": self.opt.box_vote, "class_softmax": soft_scale,
                   "scoring": "pycocotools COCOeval (bbox, maxDets 100); base / novel: COCOeval restricted to those "
                              "classes with the predictions of every class (generalized setting)"})
        closed = (" Closed-vocabulary baseline: learned embeddings of the base classes, no text queries, so the "
                  "novel classes cannot be scored (novel AP 0 by construction).") if self._closed() else ""
        section = (f"## Detection on {n} held-out emoji scenes\n\n{detection_table(ap)}\n"
                   f"{len(base)} base and {len(novel)} novel emoji classes (every {self.opt.novel_every}th id); novel "
                   f"emoji were never targets in training ({self.opt.novel_in_train} in its images). Queries: "
                   f"{self.opt.prompt!r} for every class; the {self.opt.max_detections} best (token, class) pairs per "
                   f"image after {'per-class NMS at IoU ' + str(self.opt.nms) if self.opt.nms else 'no NMS'}"
                   f"{'; scores: sigmoid times the softmax over the queries (loss_softmax)' if soft_scale else ''}"
                   f"{'; ' + rescore.describe() if rescore else ''}"
                   f"{f'; boxes voted over the tokens overlapping them at IoU >= {self.opt.box_vote:g}' if self.opt.box_vote else ''}"
                   f".{closed}")
        recall = ap.get("novel_top_box_recall")
        if recall and recall["recall"] is not None:
            section += (f" Single-query localisation: for {recall['recall']:.1%} of the {recall['n']} novel boxes, the "
                        f"token scoring highest for the box's own class has a box with IoU >= 0.5.")
        images = torch.stack([it["image"] for it in items[:12]])
        figure = Figure("detections.png", lambda path: plot_detections(images, items[:12], dets[:12], names, path,
                                                                       novel=novel),
                        caption="Held-out scenes: true boxes dashed (green base, blue novel), predictions red "
                                "(score >= 0.3, and the best one)", alt="detections")
        log.info("detection: held-out AP50 all %s, base %s, novel %s", ap["all"]["AP50"], ap["base"]["AP50"],
                 ap["novel"]["AP50"])
        split = {"name": "heldout", "held_out": True,
                 "source": f"{n} emoji detection scenes of the held-out random stream (base and novel emoji)"}
        return {"eval_split": split, "detection": ap}, RunReport(sections=[section], figures=[figure])

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float] | None:
        if self.cfg.data.kind != "emoji":
            return None
        ds = self.dataset("heldout", HELDOUT_SEED)
        ap, _ = self.run_eval(model, tokenizer, self.heldout(min(_QUICK_N, self.cfg.eval.n)), ds.class_names(),
                              list(ds.base_ids), list(ds.novel_ids))
        return {f"{g}_AP50": float(ap[g]["AP50"] or 0.0) for g in ("base", "novel")}

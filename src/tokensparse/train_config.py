"""A training run's recipe (:class:`TrainConfig`, :class:`DropConfig`) and the pure pieces of a step that depend
only on it: the learning-rate schedule and the Sparse Context fine-tune's random keep masks. The training loop is
:mod:`tokensparse.train`, which re-exports all of these."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from . import checks
from .context import SparseContextConfig
from .selection import SCORERS, RefView, budget_masks, needs_probe, score_views, shares_budget, topk_mask


@dataclass
class DropConfig:
    """Random reference dropping for the Sparse Context fine-tune.

    Each reference of each sample independently keeps everything with probability ``p_full``, else a
    fraction drawn uniformly from ``[keep_min, keep_max]`` of its tokens, chosen uniformly at random.
    With probability ``p_selected`` a sample's references instead keep, at the same drawn budgets, exactly
    what inference-time selection keeps: :func:`tokensparse.selection.select`'s ``selector`` scores, its
    even-spread tie-break and :class:`~tokensparse.SparseContextConfig`'s default ``allocate="auto"`` (several
    references share their summed budget by score when ``selector`` is informed).
    """

    p_full: float = 0.2
    keep_min: float = 0.05
    keep_max: float = 1.0
    p_selected: float = 0.0
    selector: str = "auto"

    def __post_init__(self) -> None:
        self.p_full = checks.real("p_full", self.p_full, 0.0, 1.0)
        self.keep_max = checks.real("keep_max", self.keep_max, 0.0, 1.0, lo_open=True)
        self.keep_min = checks.real("keep_min", self.keep_min, 0.0, self.keep_max, lo_open=True)
        self.p_selected = checks.real("p_selected", self.p_selected, 0.0, 1.0)
        checks.choice("selector", self.selector, SCORERS)
        if needs_probe(self.selector):
            raise ValueError(f"selector must be a scorer that needs no model probe, got {self.selector!r}")


@dataclass
class TrainConfig:
    """Everything a run needs; saved beside its checkpoints."""

    out: str = "runs/base"
    model: str = "refdit-s"
    init: str | None = None  # a checkpoint (.safetensors saved by save_checkpoint, or a run folder) to start from
    steps: int = 6000
    max_minutes: float | None = None  # wall budget of the whole run, resumes included: stop and checkpoint
    batch_size: int = 32
    lr: float = 3e-4
    min_lr_frac: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    drop: DropConfig | None = None
    route: float = 0.0  # TREAD: fraction of target tokens that skip the model's route_span (needs one)
    cond_drop: float = 0.0  # fraction of samples trained with the null prompt (what CFG's unconditional pass needs)
    tasks: list[str] | None = None
    family_weights: dict[str, float] | None = None  # relative share of batches per family (default equal)
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 50
    stop_at: int | None = None  # stop after this step, as if killed (tests, manual pauses); resume continues
    eval_every: int = 1000
    eval_samples: int = 32
    mixed_precision: str = "no"
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) on qkv / proj / fc1 / fc2 of init, frozen; export merges them

    def __post_init__(self) -> None:
        from .data.stream import check_stream
        from .models.zoo import CHECKPOINTS, CONFIGS

        if not isinstance(self.out, (str, Path)):
            raise TypeError(f"out must be a folder path, got {type(self.out).__name__}")
        self.out = str(self.out)
        if not self.out.strip():  # "" resolves to the current directory: its files would become a run folder
            raise ValueError("out must name a run folder, got an empty path (give '.' to train into this folder)")
        checks.choice("model", self.model, list(CONFIGS) + list(CHECKPOINTS))  # an architecture or shipped name
        if self.init is not None:
            if not isinstance(self.init, (str, Path)):
                raise TypeError(f"init must be a checkpoint path or None, got {type(self.init).__name__}")
            self.init = str(self.init)
        if isinstance(self.drop, dict):
            _check_fields(DropConfig, self.drop, "drop")
            try:
                self.drop = DropConfig(**self.drop)
            except (TypeError, ValueError) as e:  # name the field as the recipe spells it: drop.p_full
                raise type(e)(f"drop.{e}") from None
        if self.drop is not None and not isinstance(self.drop, DropConfig):
            raise TypeError(f"drop must be a DropConfig, a dict of its fields or None, got {type(self.drop).__name__}")
        check_stream(self.tasks, self.family_weights)
        # stored as config.json reads them back (a list, float weights): a resume compares the two, and a tuple
        # of tasks or numpy weights would differ from (or not be written as) the saved recipe's
        if self.tasks is not None:
            self.tasks = [str(t) for t in self.tasks]
        if self.family_weights is not None:
            self.family_weights = {str(f): float(w) for f, w in self.family_weights.items()}
        checks.choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "eval_every", "eval_samples"):
            setattr(self, name, checks.integer(name, getattr(self, name), lo=1))
        for name in ("warmup", "lora_rank"):
            setattr(self, name, checks.integer(name, getattr(self, name), lo=0))
        if self.lora_rank > 0 and self.init is None:
            raise ValueError("lora_rank > 0 needs init (a trained checkpoint to adapt): a fresh RefDiT's "
                             "zero-initialised adaLN gates give the adapters no gradient")
        self.seed = checks.seed("seed", self.seed)
        self.lr = checks.real("lr", self.lr, 0.0, lo_open=True)
        for name in ("min_lr_frac", "cond_drop"):
            setattr(self, name, checks.real(name, getattr(self, name), 0.0, 1.0))
        # ema = 1 would keep the starting weights forever: the exported (EMA) model would never learn
        self.ema = checks.real("ema", self.ema, 0.0, 1.0, hi_open=True)
        for name in ("weight_decay", "grad_clip"):
            setattr(self, name, checks.real(name, getattr(self, name), 0.0))
        self.route = checks.real("route", self.route, 0.0, 1.0, hi_open=True)
        if self.route > 0 and CONFIGS[CHECKPOINTS.get(self.model, self.model)].route_span is None:
            raise ValueError(f"route > 0 needs a model with a route_span; {self.model} has none")
        if self.max_minutes is not None:
            self.max_minutes = checks.real("max_minutes", self.max_minutes, 0.0, lo_open=True)
        if self.stop_at is not None:
            self.stop_at = checks.integer("stop_at", self.stop_at, lo=0)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise TypeError(f"a recipe must be a dict (JSON object), got {type(d).__name__}")
        _check_fields(cls, d, "recipe")
        return cls(**d)


def _check_fields(cls: type, d: dict, what: str) -> None:
    """``TypeError`` naming the keys of ``d`` that are no field of the dataclass ``cls`` (a typo in a recipe read
    as ``TrainConfig.__init__() got an unexpected keyword argument``), with the closest field where one is near."""
    import difflib

    names = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TypeError(f"unknown {what} field{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}{hint}; fields: {', '.join(names)}")


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_frac * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def random_keep_mask(grids: tuple[tuple[int, int], ...], batch: int, drop: DropConfig,
                     generator: torch.Generator, views: list[RefView] | None = None) -> Tensor:
    """Keep mask ``(B, N)`` over the dense reference sequence: each reference drops independently.

    ``views`` (one per reference, as :func:`tokensparse.api.reference_views` builds them) are needed when
    ``drop.p_selected > 0``; with ``p_selected == 0`` the draws are those of plain random dropping.
    """
    if drop.p_selected > 0 and (views is None or len(views) != len(grids)):
        raise ValueError("DropConfig.p_selected > 0 needs one RefView per reference")
    if views is not None and any(v.batch != batch or v.grid != g for v, g in zip(views, grids)):
        raise ValueError(f"views must match the batch ({batch}) and grids {grids}")
    masks, counts = [], []
    for h, w in grids:
        n = h * w
        frac = drop.keep_min + (drop.keep_max - drop.keep_min) * torch.rand(batch, generator=generator)
        frac = torch.where(torch.rand(batch, generator=generator) < drop.p_full, torch.ones(batch), frac)
        counts.append((frac * n).round().clamp(1, n).long())
        masks.append(topk_mask(torch.rand(batch, n, generator=generator), counts[-1]))
    if drop.p_selected > 0:  # what select() keeps at these budgets, for a p_selected share of the samples
        chosen = torch.rand(batch, generator=generator) < drop.p_selected
        scores, ties = score_views(views, drop.selector, generator)
        share = shares_budget(drop.selector, SparseContextConfig.allocate, len(grids))  # the API's default
        picked = budget_masks(scores, counts, [1] * len(grids), ties, share)
        masks = [torch.where(chosen[:, None], p, m) for p, m in zip(picked, masks)]
    return torch.cat(masks, 1)

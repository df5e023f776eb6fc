"""Train RefDiT on the task suite (stage 1, dense) and fine-tune it with random reference dropping (stage 2).

Runs on accelerate, so the same code runs as one CPU process, as several (``torchrun --nproc_per_node 2``, or
``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine; ``launch --cpu`` starts a single
process), or on many GPUs. Everything random in step ``k``
(data batch, times, noise, drop ratios) is a pure function of ``(seed, k, rank)``, so a killed run resumed
from its last checkpoint continues bit-exactly (weights, EMA, optimizer; the logged loss average restarts its
window).

Checkpoints are folders ``<out>/step_<k>/`` holding ``model.safetensors``, ``ema.safetensors``,
``optim.pt`` (tensors only, loaded with ``weights_only=True``), ``state.json`` and, under fp16, ``scaler.pt``
(the loss scaler's state, so a resumed fp16 run continues its scale); each is written to a
temp folder and renamed, then ``<out>/latest`` is replaced atomically (:mod:`.run_checkpoints`). The resolved
config is saved as ``<out>/config.json`` (a resumed run keeps the ``out`` it was started with, however the
resume spells the folder's path); a run that fails or stops before its first checkpoint removes it again (and
the folders it made), so a later run into that folder starts fresh.

The logged loss (``state["losses"]`` and the log line, every ``log_every`` steps) is the mean over all processes
of their losses since the previous log: one all-reduce per log step. The progress bar shows the main process's
own running loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .api import reference_views
from .extras import require
from .files import published, read_safetensors
from .flow import interpolate, sample_t, velocity
from .models.refdit import RefDiT, RefDiTConfig
from .models.zoo import CHECKPOINTS, build_model, save_checkpoint, weights_dir
from .run_checkpoints import (  # noqa: F401  (latest_checkpoint / save_run_checkpoint / export_conflict: importable)
    changed_fields,
    check_ema_fits,
    check_optim_fits,
    discarded_unless_saved,
    export_conflict,
    latest_checkpoint,
    load_into,
    load_optim,
    read_part,
    read_scaler,
    read_state,
    remove_partial_saves,
    restore_scaler,
    save_run_checkpoint,
    scaler_restarts,
    state_tensors,
)
from .run_processes import (  # noqa: F401  (accelerator: importable from here)
    accelerator,
    all_finite,
    any_process,
    process_mean,
    run_accelerator,
    side_generator,
    step_generator,
)
from .train_config import DropConfig, TrainConfig, lr_at, random_keep_mask  # noqa: F401  (importable)
from .vocab import detokenize, tokenize

if TYPE_CHECKING:
    from accelerate import Accelerator


# --------------------------------------------------------------------------------------------------
# Starting points
# --------------------------------------------------------------------------------------------------


def init_path(init: str) -> Path:
    """Where a recipe's ``init`` is: the path it names, or a shipped model's weights by name."""
    path = Path(init)
    return weights_dir() / f"{init}.safetensors" if not path.exists() and init in CHECKPOINTS else path


def init_model(cfg: TrainConfig) -> RefDiT:
    """The model a run starts from: untrained, or ``cfg.init`` (a shipped-style checkpoint or a run folder's EMA)."""
    if cfg.init is None:
        return build_model(cfg.model)
    init = init_path(cfg.init)
    if init.is_dir():
        try:
            tensors = run_ema(init)[0].state_dict()
        except (OSError, json.JSONDecodeError) as exc:  # no checkpoint, or no config.json beside it
            raise ValueError(f"init {init} is not a run folder with a checkpoint ({exc})") from None
    elif init.is_file():
        tensors = read_safetensors(init)
    else:
        raise FileNotFoundError(f"init checkpoint {init} not found")
    # weights go into cfg.model's architecture, so a joint-attention checkpoint can start a K/V-cache
    # (ref_attends_target=False) model: the two have the same parameters
    model = build_model(cfg.model)
    try:
        load_into(model, {k: v.float() for k, v in tensors.items()})
    except ValueError as exc:  # another architecture: say it is the init, and which model it had to fit
        raise ValueError(f"init {init} does not fit the recipe's model {cfg.model!r} ({exc}); give init a "
                         f"checkpoint of {cfg.model!r}'s architecture, or the model it was trained as") from None
    return model


def run_ema(run: str | Path) -> tuple[RefDiT, TrainConfig, Path]:
    """A run folder's latest EMA weights as a plain RefDiT (a LoRA run's adapters merged), with the run's
    config and the checkpoint folder."""
    run = Path(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in run folder {run}")
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    return plain_model(cfg.model, read_safetensors(ckpt / "ema.safetensors"), cfg.lora_rank), cfg, ckpt


def plain_model(config: str | RefDiTConfig, tensors: dict[str, Tensor], lora_rank: int = 0) -> RefDiT:
    """A plain RefDiT of ``config`` (a name or a config) holding a run's ``tensors``; a LoRA run's
    (``lora_rank > 0``: the frozen base and the adapters) are loaded into the adapted model and merged."""
    model = build_model(config)
    if lora_rank > 0:
        model = _with_lora(model, lora_rank)
    load_into(model, tensors)
    return _merge_lora(model) if lora_rank > 0 else model


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    state: dict  # step, elapsed_s, losses [[step, mean loss over processes since the last log]], evals
    model: RefDiT  # this process's trained (non-EMA) model


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Run (or resume) a training run in ``cfg.out``; one that fails or stops (``stop_at`` 0, a spent
    ``max_minutes``) before its first checkpoint leaves no run folder behind
    (:func:`.run_checkpoints.discarded_unless_saved`). It may be called again in the same process,
    with another ``mixed_precision`` too (:func:`.run_processes.accelerator`); accelerate's shared state is left
    as the call found it (:func:`.run_processes.run_accelerator`). ``log`` gets the run's messages; under a
    multi-process launch the run-wide ones (resumed from, the loss every ``log_every`` steps) come from the main
    process only, while each process says where it stopped on its wall budget."""
    out = Path(os.path.realpath(cfg.out))  # '..' as the kernel reads it, without making a missing 'a' of 'a/../b'
    with run_accelerator(cfg.mixed_precision) as acc, discarded_unless_saved(out, enabled=acc.is_main_process):
        return _train(cfg, out, acc, log, progress)


def _train(cfg: TrainConfig, out: Path, acc: Accelerator, log: Callable[[str], None], progress: bool) -> TrainResult:
    from .data import train_batches

    torch.manual_seed(cfg.seed)
    ckpt = latest_checkpoint(out)
    saved_state = read_state(ckpt) if ckpt is not None else None
    recipe = asdict(cfg)  # what config.json says, in the run folder and beside each checkpoint
    if ckpt is not None:
        started = check_resume(out, ckpt, saved_state, cfg, acc.num_processes)
        recipe["out"] = started["out"]  # the same folder however this session spells it ('.', '../run'): kept
    else:
        check_not_foreign(out)
    if ckpt is None and cfg.init is None and cfg.model in CHECKPOINTS:
        log(f"model {cfg.model!r} names shipped weights, but a run without init starts from random weights of "
            f"its architecture {CHECKPOINTS[cfg.model]!r}; set init to {cfg.model!r} to fine-tune them")
    # a missing or unfitting init fails here, before the run folder is made; a resumed run needs no init
    model = build_model(cfg.model) if ckpt is not None else init_model(cfg)
    if cfg.lora_rank > 0:
        model = _with_lora(model, cfg.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = {k: v.detach().clone().float() for k, v in state_tensors(model).items()}
    state: dict = {"step": 0, "elapsed_s": 0.0, "evals": [], "losses": [], "num_processes": acc.num_processes}

    if ckpt is not None:
        state = {**saved_state, "num_processes": acc.num_processes}
        if state["step"] > cfg.steps:  # checked before config.json is rewritten: the run folder stays as it was
            raise ValueError(f"run folder {out} is at step {state['step']}, past steps={cfg.steps}: give "
                             f"steps={state['step']} or more to train on, or a new --out")
        weights = read_part(ckpt, "model.safetensors", read_safetensors)
        try:
            load_into(model, weights)
        except ValueError as exc:
            raise ValueError(f"run folder {out} holds a checkpoint of another model than the recipe's "
                             f"{cfg.model!r} ({exc}); use a new --out, or the recipe the run started with") from None
        saved_ema = read_part(ckpt, "ema.safetensors", read_safetensors)
        check_ema_fits(saved_ema, ema, ckpt)
        ema = saved_ema
        optim = read_part(ckpt, "optim.pt", load_optim)
        try:
            opt.load_state_dict(optim)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {ckpt}: optim.pt does not fit this run's optimizer ({exc})") from None
        check_optim_fits(opt, ckpt)
        if not restore_scaler(acc.scaler, read_scaler(ckpt), ckpt):
            log(scaler_restarts(ckpt))
        if acc.is_main_process:  # once per run, not once per process
            log(f"resumed from {ckpt} at step {state['step']}")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with published(out / "config.json") as (tmp,):  # atomic: a failed write keeps the run's recipe whole
            tmp.write_text(json.dumps(recipe, indent=2))
        remove_partial_saves(out)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    ema = {k: v.to(acc.device) for k, v in ema.items()}  # EMA lives beside the weights (GPU runs)
    size = raw.config.image_size
    start_step, t_start = state["step"], time.time() - state["elapsed_s"]
    batches = train_batches(cfg.batch_size, size, seed=cfg.seed, tasks=cfg.tasks, family_weights=cfg.family_weights,
                            start=start_step * acc.num_processes + acc.process_index, stride=acc.num_processes)
    window: list[float] = []
    step = saved = start_step  # saved: the step the run folder's latest checkpoint holds (a fresh run: none needed)
    bar = _progress(progress and acc.is_main_process and sys.stdout.isatty(), cfg.steps, start_step)
    model.train()
    while step < cfg.steps:
        if cfg.stop_at is not None and step >= cfg.stop_at:
            break
        if cfg.max_minutes is not None and any_process(acc, time.time() - t_start > 60 * cfg.max_minutes):
            log(f"wall budget of {cfg.max_minutes} min reached at step {step}")
            break
        batch = next(batches)
        g = step_generator(cfg.seed, step, acc.process_index)
        x0 = batch.target * 2 - 1
        refs = [r * 2 - 1 for r in batch.refs]
        ids = tokenize(batch.prompts, raw.config.max_prompt_len)
        if cfg.cond_drop > 0:  # own stream, so noise, t, dropping and routing draws stay as without it
            g_null = side_generator(cfg.seed, step, acc.process_index, 0xC0D)
            null = torch.rand(len(ids), generator=g_null) < cfg.cond_drop
            ids = ids.masked_fill(null[:, None], 0)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_t(x0.shape[0], g)
        keep = None
        if cfg.drop is not None and refs:
            grids = tuple((size // raw.config.patch_size,) * 2 for _ in refs)
            views = (reference_views(refs, raw.config.patch_size, detokenize(ids))  # the prompt after cond_drop
                     if cfg.drop.p_selected else None)
            keep = random_keep_mask(grids, x0.shape[0], cfg.drop, g, views)
        dev = acc.device
        x0, noise, t, ids = x0.to(dev), noise.to(dev), t.to(dev), ids.to(dev)
        keep = keep.to(dev) if keep is not None else None
        refs = [r.to(dev) for r in refs]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with acc.autocast():
            g_route = side_generator(cfg.seed, step, acc.process_index, 0x5EED) if cfg.route else None
            pred = model(interpolate(x0, noise, t), t, refs, ids, ref_keep=keep, route=cfg.route,
                         route_generator=g_route)
            loss = (pred.float() - velocity(x0, noise)).pow(2).mean()
        loss_value = float(loss.detach())
        if not all_finite(acc, loss_value):  # before the update: the run folder keeps its last finite checkpoint
            kept = (f"keeps its last checkpoint (step {saved}), which is finite" if latest_checkpoint(out)
                    else "has no checkpoint yet")
            raise ValueError(f"the loss is not finite at step {step + 1} (diverged: a lower lr, or more warmup?); "
                             f"the run folder {kept}")
        acc.backward(loss)
        if cfg.grad_clip:
            acc.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            current = state_tensors(raw)
            torch._foreach_lerp_([ema[k] for k in current], [v.float() for v in current.values()], 1 - d)
        window.append(loss_value)
        if bar is not None:
            bar[0].update(bar[1], completed=step, description=f"loss {sum(window[-50:]) / len(window[-50:]):.4f}")
        if step % cfg.log_every == 0:
            state["losses"].append([step, process_mean(acc, sum(window) / len(window))])  # all processes
            if acc.is_main_process and bar is None:
                log(f"step {step}/{cfg.steps} loss {state['losses'][-1][1]:.4f} "
                    f"({(time.time() - t_start) / 60:.1f} min)")
            window = []
        if step % cfg.eval_every == 0 and acc.is_main_process:
            state["evals"].append({"step": step, **evaluate_ema(raw, ema, cfg.eval_samples, lora_rank=cfg.lora_rank)})
            log(eval_line(state["evals"][-1]))  # rounded; state.json keeps full precision
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            state["elapsed_s"] = time.time() - t_start
            if acc.is_main_process:
                save_run_checkpoint(out, step, raw, ema, opt, state, config=recipe, scaler=acc.scaler)
            saved = step
            acc.wait_for_everyone()
    state["elapsed_s"] = time.time() - t_start
    state["step"] = step
    if step == 0:  # stop_at 0, a spent wall budget: no checkpoint, so discarded_unless_saved leaves no run folder
        log("stopped before its first step: nothing saved")
    if acc.is_main_process and step != saved:  # stopped early (stop_at, max_minutes) between checkpoints
        save_run_checkpoint(out, step, raw, ema, opt, state, config=recipe, scaler=acc.scaler)
    acc.wait_for_everyone()  # the last checkpoint is on disk before any process goes on (export, exit)
    if bar is not None:
        bar[0].stop()
    return TrainResult(state, raw)


#: recipe fields a resumed run may change: when to stop, and how often to log, evaluate and checkpoint
RESUMABLE_CHANGES = frozenset({"out", "init", "steps", "max_minutes", "stop_at", "ckpt_every", "log_every",
                               "eval_every", "eval_samples"})


def check_resume(out: Path, ckpt: Path, state: dict, cfg: TrainConfig, num_processes: int) -> dict:
    """``ValueError`` unless ``cfg`` may continue the run in ``out`` (checkpoint ``ckpt``, its ``state.json`` as
    ``state``): the same recipe
    but for :data:`RESUMABLE_CHANGES`, and the same number of processes (each process reads its own slice of
    the data stream and the global batch is theirs together). Returns the recipe the run started with (as a
    dict of :class:`TrainConfig`'s fields)."""
    saved = ckpt / "config.json" if (ckpt / "config.json").is_file() else out / "config.json"
    try:
        before = asdict(TrainConfig.from_dict(json.loads(saved.read_text())))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"run folder {out}: cannot read the recipe it started with ({saved}: {exc}); use a new "
                         "--out") from None
    changed = changed_fields(before, asdict(cfg), RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"run folder {out} was started with another recipe ({'; '.join(changed)}); resume it "
                         f"with the recipe it started with (only {', '.join(sorted(RESUMABLE_CHANGES))} may "
                         "change), or use a new --out")
    ran = state.get("num_processes")
    if ran is not None and ran != num_processes:
        raise ValueError(f"run folder {out} was trained by {ran} processes and this run has {num_processes}: "
                         "each process reads its own slice of the data and the global batch is theirs together; "
                         f"resume with {ran}, or use a new --out")
    return before


def check_not_foreign(out: Path) -> None:
    """``ValueError`` when folder ``out`` (which holds no checkpoint) has a ``config.json`` that is not a training
    recipe: a fresh run writes its own there, and would replace, say, a model folder's config."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        found = None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(found, dict) or not found or not set(found) <= fields:  # a recipe: of a run that saved nothing
        raise ValueError(f"{out} holds a config.json that is not a training recipe, which this run would replace "
                         "with its own: train into a new or empty --out")


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                 TimeRemainingColumn())
    task = p.add_task("training", total=total, completed=done)
    p.start()
    return p, task


def ema_model(raw: RefDiT, ema: dict[str, Tensor], lora_rank: int = 0) -> RefDiT:
    """A plain RefDiT of ``raw``'s config holding the EMA weights, in eval mode: what :func:`export_ema` writes. A
    LoRA run (``lora_rank > 0``) averages its adapters (the frozen base stays as it is): they are merged."""
    ref = next(raw.parameters())
    model = plain_model(raw.config, {k: v.to(ref.dtype) for k, v in ema.items()}, lora_rank)
    return model.to(ref.device).eval()


@torch.no_grad()
def evaluate_ema(raw: RefDiT, ema: dict[str, Tensor], n: int, steps: int = 10, lora_rank: int = 0
                 ) -> dict[str, float]:
    """Held-out PSNR per family of the EMA weights (``n`` samples per family, ``steps`` Euler steps); a LoRA
    run's (``lora_rank > 0``) with the adapters merged."""
    from .data import FAMILIES, heldout
    from .generate import generate
    from .metrics import psnr

    model = ema_model(raw, ema, lora_rank)
    out = {}
    for fam in FAMILIES:
        vals = []
        for s in heldout(fam, n, raw.config.image_size):
            pred = generate(model, s.refs, s.prompt, steps=steps, seed=s.seed).cpu()
            vals.append(float(psnr(pred, s.target[None])[0]))
        out[fam] = sum(vals) / len(vals)
    return out


def eval_line(entry: dict) -> str:
    """The training log's line for one held-out eval ``{"step": N, family: PSNR, ...}`` (as ``state["evals"]`` holds
    it, at full precision): ``step N: held-out PSNR editing 18.42 dB, subject 17.91 dB, ...``."""
    parts = [f"{fam} {value:.2f} dB" if isinstance(value, (int, float)) else f"{fam} {value}"
             for fam, value in entry.items() if fam != "step"]
    return f"step {entry.get('step')}: held-out PSNR " + ", ".join(parts)


def export_ema(run: str | Path, path: str | Path, meta: dict | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write the latest EMA weights of a run as a shippable checkpoint (safetensors + JSON beside it);
    ``ValueError`` for a ``path`` that would overwrite the run's own files (:func:`export_conflict`)."""
    conflict = export_conflict(run, path)
    if conflict is not None:
        raise ValueError(f"cannot export {run} to {path}: {conflict}; export elsewhere")
    model, cfg, ckpt = run_ema(run)
    state = read_state(ckpt)
    info = {"recipe": asdict(cfg), "step": state["step"], "wall_minutes": state["elapsed_s"] / 60,
            "evals": state.get("evals", []), **(meta or {})}
    save_checkpoint(model, path, info, dtype=dtype)
    return Path(path)


def _with_lora(model: RefDiT, rank: int) -> RefDiT:
    """Freeze ``model`` and add LoRA adapters (peft) to its attention and MLP projections."""
    require("peft", "a LoRA run of RefDiT (lora_rank > 0)")
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv", "proj", "fc1", "fc2"])
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def _merge_lora(model: RefDiT) -> RefDiT:
    """Fold the LoRA adapters of :func:`_with_lora` into their layers' weights: a plain RefDiT again."""
    require("peft", "a LoRA run of RefDiT (lora_rank > 0)")
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model

"""LoRA fine-tuning of FLUX.2 [klein] with random reference-token dropping (the Sparse Context recipe).

Each step keeps a random subset of every reference's tokens, at a ratio drawn from
``U(keep_min, keep_max)``, so the model learns to work from partial references whichever tokens a
selector keeps at inference. Dropping is done by the same hook as inference
(:func:`~tokensparse.integrations.diffusers.apply_sparse_context_diffusers` with ``selector="random"``),
re-seeded every step. Loss: rectified flow, the transformer predicts ``noise - x0`` at
``x_t = (1 - t) x0 + t noise`` with logit-normal ``t`` (FLUX's convention).

The VAE and text encoder are frozen and run once per example; only LoRA weights on the transformer's
attention projections train. ``accelerate`` places the model (one CPU process, one GPU, or many); each
process draws its own example, keep ratio, timestep, noise and kept tokens every step from ``(seed, step,
rank)``, and the recorded loss is the mean over processes.

A run checkpoints every ``save_every`` steps and at its end (:mod:`.diffusers_lora_checkpoints`); a run of the
same recipe into the same output folder resumes from the newest checkpoint and continues bit-exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checks
from ..context import SparseContextConfig
from ..extras import require
from ..files import default_mode, nearest_existing
from ..images import MAX_SIDE, load_rgb
from ..run_checkpoints import remove_partial_saves
from ..run_processes import cpu_only, process_mean, step_generator
from .classes import known_name
from .diffusers import apply_sparse_context_diffusers, remove_sparse_context_diffusers, sparse_context_state
from .diffusers_lora_checkpoints import (  # noqa: F401  (LoraCheckpointError, examples_digest: importable here)
    CHECKPOINTS,
    LoraCheckpointError,
    Resume,
    base_fingerprint,
    check_precision,
    check_processes,
    examples_digest,
    find_checkpoint,
    is_target,
    read_checkpoint,
    restore,
    save,
)

SUPPORTED = ("Flux2KleinPipeline",)
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name, what load_lora_weights(folder) reads
_ADAPTER = "tokensparse_sparse_context"  # the adapter this trainer adds to the transformer


class LoraWriteError(OSError):
    """Training finished but its files could not be written (the adapter stays on the pipeline)."""


@dataclass
class LoraTrainConfig:
    """Resolved training settings (written next to the LoRA weights as ``train_config.json``, and into every
    checkpoint). A run may resume with other ``steps`` and ``save_every``, nothing else."""

    steps: int = 500
    lr: float = 1e-4
    rank: int = 16
    keep_min: float = 0.1
    keep_max: float = 1.0
    resolution: int = 512
    max_sequence_length: int = 512
    seed: int = 0
    save_every: int = 100  # checkpoint every this many steps (and at the end)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        self.steps = checks.integer("steps", self.steps, lo=1)
        self.save_every = checks.integer("save_every", self.save_every, lo=1)
        self.rank = checks.integer("rank", self.rank, lo=1)
        self.keep_max = checks.real("keep_max", self.keep_max, 0.0, 1.0, lo_open=True)
        self.keep_min = checks.real("keep_min", self.keep_min, 0.0, self.keep_max, lo_open=True)
        self.resolution = checks.integer("resolution", self.resolution, 16, MAX_SIDE)
        if self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16, got {self.resolution}")
        self.lr = checks.real("lr", self.lr, 0.0, lo_open=True)
        self.max_sequence_length = checks.integer("max_sequence_length", self.max_sequence_length, lo=1)
        self.seed = checks.integer("seed", self.seed, 0, 2**31 - 1)  # each step's draws: step_generator(seed, ...)
        if not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(m, str) for m in self.target_modules):
            raise TypeError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module to put the LoRA on")
        self.target_modules = list(self.target_modules)  # a tuple equals its JSON round trip (resume compares)


@dataclass
class Example:
    """One training example: reference images (PIL), the target image, the instruction."""

    refs: list[Any]
    target: Any
    prompt: str


def _natural(path: Path) -> list:
    """Sort key: numbers by value, so ``ref2.png`` comes before ``ref10.png`` ("image 2" of a prompt)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_examples(data: str | Path) -> list[Example]:
    """One example per sub-folder of ``data``: ``ref*.png`` (one or more, in natural order: ``ref2`` before
    ``ref10``), ``target.png``, ``prompt.txt`` (UTF-8).

    Hidden sub-folders (``.ipynb_checkpoints``, ...) are skipped. ``ValueError`` naming ``data`` when it is
    missing or a file."""
    if not Path(data).is_dir():
        raise ValueError(f"data folder {data} {'is a file' if Path(data).exists() else 'does not exist'}; "
                         "expected a folder of <example>/ref*.png, target.png, prompt.txt")
    examples = []
    for folder in sorted(p for p in Path(data).iterdir() if p.is_dir() and not p.name.startswith(".")):
        refs = sorted(folder.glob("ref*.png"), key=_natural)
        if not refs or not (folder / "target.png").is_file() or not (folder / "prompt.txt").is_file():
            raise ValueError(f"{folder}: needs ref*.png, target.png and prompt.txt")
        try:
            prompt = (folder / "prompt.txt").read_text(encoding="utf-8-sig").strip()  # -sig: drops a BOM
        except UnicodeDecodeError as exc:
            raise ValueError(f"{folder / 'prompt.txt'} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        examples.append(Example([load_rgb(r) for r in refs], load_rgb(folder / "target.png"), prompt))
    if not examples:
        raise ValueError(f"no example folders in {data}")
    return examples


def check_data_out(data: str | Path, out: str | Path) -> None:
    """``ValueError`` when the output folder ``out`` is the data folder ``data`` or inside it: the run's files
    (``checkpoints/``, the output folder itself) would be read as an example folder by the next run's
    :func:`load_examples`, so resuming would fail."""
    data_abs, out_abs = Path(data).resolve(), Path(out).resolve()
    if out_abs == data_abs or data_abs in out_abs.parents:
        where = "is the --data folder" if out_abs == data_abs else f"is inside --data {data}"
        raise ValueError(f"--out {out} {where}: the next run would read the output folder as an example (and "
                         "could not resume); write the LoRA outside the data folder")


@dataclass
class _Encoded:
    x0: torch.Tensor  # (1, n_target, C) packed target latents
    target_ids: torch.Tensor  # (1, n_target, 4)
    refs: torch.Tensor  # (1, n_refs, C)
    ref_ids: torch.Tensor  # (1, n_refs, 4)
    text: torch.Tensor  # (1, L, D)
    text_ids: torch.Tensor  # (1, L, 4)


@torch.no_grad()
def _encode(pipe: Any, ex: Example, cfg: LoraTrainConfig, device: torch.device) -> _Encoded:
    size = cfg.resolution
    proc = pipe.image_processor
    target = proc.preprocess(ex.target, height=size, width=size, resize_mode="crop").to(
        device, pipe.vae.dtype
    )
    latents = pipe._encode_vae_image(target, generator=None)  # (1, C, h, w), patchified + normalized
    refs = [proc.preprocess(r, height=size, width=size, resize_mode="crop") for r in ex.refs]
    ref_latents, ref_ids = pipe.prepare_image_latents(refs, 1, None, device, pipe.vae.dtype)
    text, text_ids = pipe.encode_prompt(ex.prompt, device=device, max_sequence_length=cfg.max_sequence_length)
    return _Encoded(
        pipe._pack_latents(latents),
        pipe._prepare_latent_ids(latents).to(device),
        ref_latents,
        ref_ids,
        text,
        text_ids,
    )


def train_lora_sparse(
    pipe: Any,
    examples: Sequence[Example],
    cfg: LoraTrainConfig,
    out_dir: str | Path,
    log: Callable[[int, float, float], None] | None = None,
) -> list[float]:
    """Train a LoRA on ``pipe.transformer`` with random reference dropping; save it to ``out_dir``.

    ``out_dir`` gets ``pytorch_lora_weights.safetensors`` (load with ``pipe.load_lora_weights(out_dir)``)
    and ``train_config.json``, both written to a temporary folder first and then moved in (replacing those two
    files of an earlier run there). Checkpoints go to ``out_dir/checkpoints/`` every ``cfg.save_every`` steps and
    at the end; when ``out_dir`` holds one, the run resumes from it and continues exactly as an uninterrupted run
    would have (a finished run given more ``steps`` trains on). One of another recipe (but for ``steps`` and
    ``save_every``), of other examples, on another base model or number of processes, or damaged is refused
    before any training: :class:`LoraCheckpointError` (a ``ValueError``). Returns the loss of every step, the
    resumed run's earlier ones included.
    ``log(step, keep, loss)`` is called per step. The LoRA goes on ``cfg.target_modules`` (by default the
    image-stream attention projections of the double-stream blocks), in float32 on a half-precision model too; its
    initialisation and every draw of
    training come from ``cfg.seed`` (each process's from ``(seed, step, rank)``), so a run repeats exactly (on
    the same devices and number of processes) and leaves the global RNG alone; the losses are means over processes.

    Everything that can be checked before training is (:func:`check_lora_run`: the pipeline, the output
    folder; :func:`find_checkpoint` and :func:`read_checkpoint`: the checkpoint to resume). Afterwards the trained
    adapter stays on ``pipe.transformer`` as its active adapter (also when only writing the files fails:
    ``OSError``); ``requires_grad`` flags are restored. If training fails, the
    adapter is removed as well (with adapters of the caller's loaded, modules that only this trainer
    targeted keep an empty LoRA wrapper: same outputs, renamed state-dict keys).
    """
    for package in ("accelerate", "peft"):  # diffusers is there: pipe is its pipeline
        require(package, "train_lora_sparse")
    out = Path(out_dir)
    check_lora_run(pipe, out)
    if not examples:
        raise ValueError("no training examples")
    names = [n for n, _ in pipe.transformer.named_modules()]
    unmatched = [t for t in cfg.target_modules if not any(is_target(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no module of {type(pipe.transformer).__name__}")
    ids = {"data": examples_digest(examples), "base": base_fingerprint(pipe.transformer, cfg.target_modules)}
    found, resume = find_checkpoint(out, cfg, ids["data"], base=ids["base"]), None
    if found is not None:
        from accelerate import PartialState

        check_processes(*found, PartialState(cpu=cpu_only()).num_processes)
        resume = read_checkpoint(*found)
    frozen = {p: p.requires_grad for m in (pipe.vae, pipe.text_encoder, pipe.transformer) for p in m.parameters()}
    others = bool(getattr(pipe.transformer, "peft_config", None))  # adapters the caller loaded before
    try:
        losses, state = _train(pipe, examples, cfg, log, out, ids, resume)
    except BaseException:  # a failed run removes its adapter
        if _ADAPTER in (getattr(pipe.transformer, "peft_config", None) or {}):
            if others:
                pipe.transformer.delete_adapters(_ADAPTER)
            else:
                pipe.transformer.unload_lora()  # the LoRA wrappers too: the original modules again
        if not others and not getattr(pipe.transformer, "peft_config", None):
            pipe.transformer._hf_peft_config_loaded = False  # diffusers sets it before adding: adding failed
        raise
    finally:
        for param, flag in frozen.items():
            param.requires_grad_(flag)
    if state is not None:  # the main process writes
        _save(pipe, state, cfg, out)
    return losses


def check_lora_run(pipe: Any, out: Path) -> None:
    """What :func:`train_lora_sparse` checks before any work: ``TypeError`` / ``ValueError`` for a pipeline it
    cannot train, ``OSError`` for an output folder it could not write to afterwards."""
    if known_name(type(pipe), SUPPORTED) is None:  # a subclass of a supported pipeline trains as its base
        raise TypeError(f"LoRA training supports {SUPPORTED} (or subclasses), got {type(pipe).__name__}")
    if sparse_context_state(pipe.transformer) is not None:
        raise ValueError("Sparse Context is applied to this pipeline: remove_sparse_context(pipe) before training "
                         "(training drops reference tokens itself, and would remove it when done)")
    if _ADAPTER in (getattr(pipe.transformer, "peft_config", None) or {}):
        raise ValueError(f"pipe.transformer already has a LoRA adapter named {_ADAPTER!r} (an earlier "
                         "train_lora_sparse): load the pipeline afresh, or pipe.transformer.unload_lora() first")
    out = Path(out)
    existing = nearest_existing(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    if not existing.is_dir():
        raise NotADirectoryError(f"output {out}: {existing} is a file, not a folder")
    for name in (WEIGHTS, "train_config.json"):
        if (out / name).is_dir():
            raise IsADirectoryError(f"output {out / name} is a folder")
    if (out / CHECKPOINTS).exists() and not (out / CHECKPOINTS).is_dir():
        raise NotADirectoryError(f"output {out / CHECKPOINTS} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write into {existing}")


def _train(pipe: Any, examples: Sequence[Example], cfg: LoraTrainConfig,
           log: Callable[[int, float, float], None] | None, out: Path, ids: dict[str, str],
           resume: Resume | None) -> tuple[list[float], dict | None]:
    """Train (from checkpoint ``resume``, if any), checkpointing into ``out``; the losses and (on the main
    process) the adapter's state dict."""
    from accelerate import Accelerator
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    accelerator = Accelerator(cpu=cpu_only())  # cpu: torchrun's ranks form a CPU world
    if resume is not None:  # mixed precision comes from accelerate's launch / config, not the recipe
        check_precision(resume.path, resume.state, accelerator.mixed_precision)
    device = accelerator.device
    pipe.to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.transformer):
        module.requires_grad_(False)
    encoded = [_encode(pipe, ex, cfg, device) for ex in examples]

    transformer = pipe.transformer
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the Gaussian initialisation from cfg.seed, not the global RNG
        torch.manual_seed(cfg.seed)
        transformer.add_adapter(
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.rank,
                init_lora_weights="gaussian",
                target_modules=list(cfg.target_modules),
            ),
            adapter_name=_ADAPTER,
        )
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    for param in params.values():  # float32 LoRA on a half-precision model: AdamW's small steps rounded away in
        param.data = param.data.float()  # bf16 (most lora_A entries never moved); peft casts the input to them
    raw_optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr)
    start, losses, elapsed = 0, [], 0.0
    if resume is not None:
        restore(resume, params, raw_optimizer, accelerator.scaler)
        start, losses, elapsed = resume.state["step"], list(resume.state["losses"]), resume.state["elapsed_s"]
    if accelerator.is_main_process:
        remove_partial_saves(out / CHECKPOINTS)  # what a save killed hard left
    model, optimizer = accelerator.prepare(transformer, raw_optimizer)
    model.train()

    started = time.time() - elapsed
    try:
        for step in range(start, cfg.steps):
            gen = step_generator(cfg.seed, step, accelerator.process_index)  # this process's draws of this step
            e = encoded[int(torch.randint(len(encoded), (1,), generator=gen))]
            keep = cfg.keep_min + (cfg.keep_max - cfg.keep_min) * float(torch.rand(1, generator=gen))
            kept_seed = int(torch.randint(2**62, (1,), generator=gen))
            apply_sparse_context_diffusers(transformer, SparseContextConfig(keep=keep, selector="random",
                                                                            seed=kept_seed))
            t = torch.sigmoid(torch.randn(1, generator=gen)).to(device)  # logit-normal timestep in (0, 1)
            noise = torch.randn(e.x0.shape, generator=gen).to(device, e.x0.dtype)
            x_t = (1 - t) * e.x0 + t * noise
            with accelerator.autocast():
                pred = model(
                    hidden_states=torch.cat([x_t, e.refs], 1).to(transformer.dtype),
                    timestep=t,
                    encoder_hidden_states=e.text,
                    txt_ids=e.text_ids,
                    img_ids=torch.cat([e.target_ids, e.ref_ids], 1),
                    guidance=None,
                    return_dict=False,
                )[0]
            loss = torch.nn.functional.mse_loss(pred[:, : e.x0.shape[1]].float(), (noise - e.x0).float())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(process_mean(accelerator, float(loss.detach())))  # every process records the mean
            if log is not None:
                log(step, keep, losses[-1])
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                if accelerator.is_main_process:
                    save(out, step + 1, params, raw_optimizer, accelerator.num_processes, losses, started, cfg,
                         ids, scaler=accelerator.scaler, mixed_precision=accelerator.mixed_precision)
                accelerator.wait_for_everyone()
    finally:
        remove_sparse_context_diffusers(transformer)
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    state = get_peft_model_state_dict(unwrapped, adapter_name=_ADAPTER) if accelerator.is_main_process else None
    return losses, state


def _save(pipe: Any, state: dict, cfg: LoraTrainConfig, out: Path) -> None:
    """Write the weights and ``train_config.json`` into a temporary folder beside them, then move both in:
    a failed write leaves ``out`` as it was. Raises :class:`LoraWriteError` naming ``out`` (a full disk)."""
    from safetensors import SafetensorError

    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out))
        type(pipe).save_lora_weights(tmp, transformer_lora_layers=state)
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        names = (WEIGHTS, "train_config.json")
        for name in names:
            default_mode(tmp / name)  # safetensors and mkdtemp make owner-only files
            if (out / name).is_dir():  # checked for both before either moves: the pair stays matched
                raise IsADirectoryError(f"{out / name} is a folder")
        for name in names:
            os.replace(tmp / name, out / name)
    except (OSError, SafetensorError) as exc:
        raise LoraWriteError(f"cannot write the LoRA to {out}: {exc}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

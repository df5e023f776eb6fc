"""Helpers shared by the benchmark scripts (never imported by the package)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tokensparse as ts
from tokensparse.data import batched, heldout
from tokensparse.files import default_mode, folder_problem, temp_beside
from tokensparse.metrics import coarse_psnr, psnr, ssim

RESULTS = Path(__file__).resolve().parent / "results"  # where readme_tables.py reads, from any working directory


def results_path(name: str, quick: bool) -> Path:
    """Default output of benchmark ``name``: this checkout's ``benchmarks/results/NAME.json`` (whatever the working
    directory), or ``NAME_quick.json`` for a ``--quick`` run (a smoke run never overwrites the committed full
    results the README quotes)."""
    return RESULTS / f"{name}{'_quick' if quick else ''}.json"


class _Parser(argparse.ArgumentParser):
    """Fills ``--out`` from ``--quick`` when it is not given, and records in ``given`` the destinations of the
    flags typed on the command line (:func:`quick_or`: a typed flag wins over ``--quick``'s small setting)."""

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.benchmark = name

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns = super().parse_args(args, namespace)
        ns.given = self._typed(args)
        if ns.out is None:
            ns.out = results_path(self.benchmark, ns.quick)
        check_json_out(ns.out, self)
        return ns

    def _typed(self, args) -> frozenset[str]:
        """The destinations the command line sets: parse it again with every default replaced by a marker."""
        unset = object()
        saved = [(action, action.default) for action in self._actions]
        try:
            for action, _ in saved:
                action.default = unset
            ns = super().parse_args(args)
        finally:
            for action, default in saved:
                action.default = default
        return frozenset(k for k, v in vars(ns).items() if v is not unset)


def quick_or(args: argparse.Namespace, name: str, quick_value: Any) -> Any:
    """``args.<name>``, or ``quick_value`` under ``--quick`` when the flag was not typed (``--quick --n 32`` runs
    32 samples: a flag given on the command line is never silently replaced by the smoke run's value)."""
    if args.quick and name not in getattr(args, "given", ()):
        return quick_value
    return getattr(args, name)


def check_json_out(out: Path, ap: argparse.ArgumentParser) -> None:
    """Refuse (``ap.error``: usage line, exit 2) before any work an ``--out`` that is not a writable ``.json``
    path: the PNG beside it is ``out`` with ``.png``, and a folder or a file on the way fails only at the end."""
    if out.suffix.lower() != ".json":
        ap.error(f"--out must be a .json path, got {out}")
    if out.is_dir():
        ap.error(f"--out {out} is a folder")
    if out.with_suffix(".png").is_dir():
        ap.error(f"--out {out}: {out.with_suffix('.png')}, where its plot goes, is a folder")
    problem = folder_problem(out.absolute().parent)
    if problem is not None:
        ap.error(f"--out {out}: {problem}")


def parser(doc: str | None, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: ``--quick`` and ``--out`` (default :func:`results_path`)."""
    ap = _Parser(name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON to write (default: benchmarks/results/{name}.json; "
                         f"with --quick benchmarks/results/{name}_quick.json)")
    return ap


def positive_int(text: str, least: int = 1) -> int:
    """An ``argparse`` ``type=`` for counts (``--n``, ``--steps``, ``--repeats``): an integer >= ``least``; else
    argparse's usage error naming the flag (exit 2, before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
    return value


def at_least_two(text: str) -> int:
    """:func:`positive_int` for counts that need two (FID's sets)."""
    return positive_int(text, 2)


def float_list(ap: argparse.ArgumentParser, flag: str, text: str, lo: float = 0.0, hi: float = 1.0,
               ) -> tuple[float, ...]:
    """The comma list ``text`` of ``flag`` as floats in ``(lo, hi]``; ``ap.error`` naming the flag when it is empty,
    holds a non-number or a value out of range."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        ap.error(f"{flag} takes a comma list of numbers, got {text!r}")
    if not values or any(not lo < v <= hi for v in values):
        ap.error(f"{flag} takes a comma list of numbers in ({lo:g}, {hi:g}], got {text!r}")
    return values


def names_list(ap: argparse.ArgumentParser, flag: str, text: str, choices: Any, empty_ok: bool = False,
               ) -> list[str]:
    """The comma list ``text`` of ``flag``, each one of ``choices``; ``ap.error`` naming the flag otherwise (and
    when it is empty, unless ``empty_ok``)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if any(v not in choices for v in names) or not (names or empty_ok):
        ap.error(f"{flag} takes a comma list of {', '.join(choices)}; got {text!r}")
    return names


def check_device(device: str, ap: argparse.ArgumentParser, flag: str = "--device") -> None:
    """Refuse (``ap.error``) before any work a device torch cannot parse, CUDA where none is available, the meta
    device (it holds no weights), a ``cuda:N`` past this machine's GPUs, or another device it cannot allocate on
    (``mps`` in a build without it): those were tracebacks once the models had loaded."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        ap.error(f"{flag} must be a torch device (cpu, cuda, cuda:1, ...), got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"{flag} {device}: no CUDA device is available here (use --device cpu)")
    if kind == "cuda":  # counted, not allocated on: a CUDA context here would hold GPU memory for the whole run
        index, count = torch.device(device).index, torch.cuda.device_count()
        if index is not None and index >= count:
            ap.error(f"{flag} {device}: not usable here (this machine has {count} CUDA device(s); use --device cpu)")
        return
    if kind == "meta":
        ap.error(f"{flag} meta holds no data: the benchmark runs models with their weights (use --device cpu)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # AssertionError: a torch built without the device's support
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__  # torch's run on
        ap.error(f"{flag} {device}: not usable here ({reason}; use --device cpu)")


def progress(done: int, total: int, what: str) -> None:
    """A progress line ``[done/total] what``; ``tokensparse bench`` turns these into a progress bar."""
    print(f"[{done}/{total}] {what}", flush=True)


def write_json(path: Path, payload: dict, plot: Callable[[], Any] | None = None, dpi: int = 110) -> None:
    """Atomic JSON write with a small provenance header (machine, torch and tokensparse versions, threads; a key
    ``payload`` sets itself wins), and the matplotlib figure ``plot()`` returns (``None``: no plot; the figure is
    closed here) beside it as ``path`` with ``.png``.

    Both are rendered to temp files first and renamed at the end, one right after the other (PNG, then JSON):
    an interrupt leaves the previous pair and no temp file. A plot that fails does not cost the results: the
    JSON is written, the previous PNG (which no longer matches it) removed, and the error raised.
    """
    payload = {"machine": platform.machine(), "torch": torch.__version__, "tokensparse": ts.__version__,
               "threads": torch.get_num_threads(), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    temps: list[Path] = []  # unique names (temp_beside): two runs writing one results file do not collide
    figure, failed = None, None
    try:
        temps.append(temp_beside(path))
        temps[0].write_text(json.dumps(payload, indent=2, default=str))
        try:
            figure = plot() if plot is not None else None
            if figure is not None:
                temps.append(temp_beside(png))
                figure.savefig(temps[1], dpi=dpi, format="png")
                default_mode(temps[1]).replace(png)  # a folder in its place fails here: the plot's failure
        except Exception as exc:  # noqa: BLE001  (re-raised below, once the results are safe)
            failed = exc
            if not png.is_dir():
                png.unlink(missing_ok=True)
        default_mode(temps[0]).replace(path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if figure is not None:
            pyplot().close(figure)
    if failed is not None:
        raise RuntimeError(f"wrote {path}, but its plot failed") from failed


def rounded(value: Any, digits: int) -> Any:
    """``value`` for printing: floats rounded to ``digits``, in nested dicts too."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return round(value, digits) if isinstance(value, float) else value


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (benchmarks draw figures for :func:`write_json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load(spec: str) -> ts.RefDiT:
    """A shipped model by name, a checkpoint path or ``untrained:<config>`` (random weights, to check that a script
    runs). A trainer step file (``runs/NAME/step_N/ema.safetensors``, no JSON beside it) is read as the recipe's
    model (the ``config.json`` of its checkpoint folder or run folder; a LoRA run's adapters merged), and as
    refdit-s where neither holds one."""
    if spec.startswith("untrained:"):
        from tokensparse.models.zoo import randomize_zero_init

        torch.manual_seed(0)  # adaLN-zero layers random, so the untrained model is not the identity
        return randomize_zero_init(ts.build_model(spec.split(":", 1)[1]), std=0.05).eval()
    if spec.endswith(".safetensors"):
        path = Path(spec)
        if path.with_suffix(".json").is_file():
            from tokensparse.models import load_checkpoint

            return load_checkpoint(path)
        return load_step_file(path)
    return ts.load_model(spec)


def load_step_file(path: Path) -> ts.RefDiT:
    """A trainer step file (``model.safetensors`` / ``ema.safetensors`` of a run's checkpoint folder) as the model
    of the recipe beside it (refdit-s without one); ``ValueError`` when the tensors do not fit that model (they
    were read into refdit-s with missing and unexpected tensors skipped: a K/V-cache or text-encoder run's weights
    became a joint-attention refdit-s, silently)."""
    from tokensparse.files import read_safetensors
    from tokensparse.train import TrainConfig, plain_model

    beside = (path.parent / "config.json", path.parent.parent / "config.json") if path.parent.name.startswith(
        "step_") else ()  # a checkpoint folder's recipe, else its run folder's
    recipe = next((p for p in beside if p.is_file()), None)
    cfg = TrainConfig.from_dict(json.loads(recipe.read_text())) if recipe is not None else None
    model, rank = (cfg.model, cfg.lora_rank) if cfg is not None else ("refdit-s", 0)
    try:
        return plain_model(model, read_safetensors(path), rank).eval()
    except ValueError as exc:
        raise ValueError(f"{path}: not a {model} checkpoint ({exc})") from None


@torch.no_grad()
def evaluate(model: ts.RefDiT, samples: list, steps: int, batch_size: int = 32, use_refs: bool = True,
             ) -> dict[str, torch.Tensor]:
    """Generate every sample (noise seed = the sample's seed) and score it against its ground truth."""
    n = len(samples)
    out = {k: torch.empty(n) for k in ("psnr", "coarse_psnr", "ssim")}
    for idx, b in batched(samples, batch_size):
        refs = b.refs if use_refs else []
        pred = ts.generate(model, refs, b.prompts, steps=steps, seed=[samples[i].seed for i in idx]).cpu()
        for k, fn in (("psnr", psnr), ("coarse_psnr", coarse_psnr), ("ssim", ssim)):
            out[k][idx] = fn(pred, b.target).float()
    return out


def heldout_by_family(n: int, image_size: int) -> dict[str, list]:
    from tokensparse.data import FAMILIES

    return {fam: heldout(fam, n, image_size) for fam in FAMILIES}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def apply_setting(model: object, keep: float, merge: float, cache: bool = False, recompute_every: int = 1) -> None:
    """Sparse Context at ``keep`` (uniform selection; ``cache``: RefDiT's reference K/V cache) and token merging
    at ratio ``merge`` (0: removed; matchings recomputed every ``recompute_every`` steps) on ``model`` -- one
    timing setting of the speed benchmarks."""
    ts.apply_sparse_context(model, ts.SparseContextConfig(keep=keep, selector="uniform", cache=cache))
    if merge > 0:
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=merge, recompute_every=recompute_every))
    else:
        ts.remove_token_merging(model)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                prepare: dict[str, Callable[[], object]] | None = None) -> dict[str, dict]:
    """Time several settings fairly on a shared machine: the settings alternate within each repeat (so load
    drifts hit all alike) and ``prepare[k]`` (untimed) runs right before every timed run of ``k`` -- switch
    the model to that setting and warm it (after a switch the allocator holds none of the new tensor sizes
    and the first run pays page faults that steady-state use never sees).

    Returns per setting the median ``wall`` and ``cpu`` (process) seconds and every repeat's ``cpu_all`` and
    ``wall_all``. With one torch thread the process time is the steadier cost measure; both are kept."""
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(warmup + repeats):
        for k, fn in runs.items():
            if prepare is not None:
                prepare[k]()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r >= warmup:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k]),
                "wall_all": wall[k], "cpu_all": cpu[k]} for k in runs}


def speedups(med: dict[str, dict], base: str = "dense") -> dict[str, dict[str, float]]:
    """``{setting: {"wall": x, "cpu": y}}``: median time of ``base`` over each setting's."""
    return {k: {c: med[base][c] / v[c] for c in ("wall", "cpu")} for k, v in med.items()}

"""Command line: ``tokensparse demo | show | train | generate | train-lora | bench``."""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .cli_checks import check_out, check_out_not_ref, check_png_out, fail, flag_names, large_images_named


class _StdoutGuard:
    """``sys.stdout`` while the command line runs: the stream it wraps, but it keeps the ``OSError`` that writing
    to it raised (``error``), so that one is told apart from any other."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.error = stream, None

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, buffer, ...: the stream's own
        return getattr(self.stream, name)


class _Group(TyperGroup):
    """The root command: writing to a standard output that fails (``> /dev/full``, a full disk) is a one-line
    error and exit 1, not a traceback (a closed pipe, ``| head``, stays a quiet exit 1, as click makes it)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        guard = _StdoutGuard(sys.stdout)
        sys.stdout = guard  # type: ignore[assignment]
        try:
            try:
                return super().main(*args, **kwargs)
            finally:  # what print() left buffered fails here, not as "Exception ignored" at the interpreter's exit
                guard.flush()
        except OSError as exc:
            if exc is not guard.error or exc.errno == errno.EPIPE:
                raise
            with contextlib.suppress(OSError, ValueError):  # nothing pending fails again at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), guard.stream.fileno())
            typer.secho(f"error: cannot write to standard output: {exc.strerror or exc}", fg=typer.colors.RED,
                        err=True)
            sys.exit(1)
        finally:
            if sys.stdout is guard:
                sys.stdout = guard.stream


# -h is --help everywhere (subcommands inherit it) but in `bench`, which passes -h on to the benchmark's script
app = typer.Typer(help="tokensparse: faster reference-conditioned diffusion transformers.", no_args_is_help=True,
                  add_completion=False, context_settings={"help_option_names": ["-h", "--help"]}, cls=_Group)
show_app = typer.Typer(help="Show models, tasks and selections.", no_args_is_help=True)
app.add_typer(show_app, name="show")
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"tokensparse {__version__}")
        raise typer.Exit()


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM's handler while a command runs: a normal exit (``SystemExit``, status 128 + 15 as a shell reports a
    signal), so ``finally`` blocks run and remove the temp files of a write in progress; a second SIGTERM ends the
    process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must not replace the exit
        print("tokensparse: stopped (SIGTERM)", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def exit_on_sigterm(ctx: typer.Context) -> None:
    """Handle SIGTERM (:func:`_stop_on_sigterm`) until ``ctx`` closes, then restore the previous handler. Python's
    default lets SIGTERM end the process on the spot, leaving a ``.NAME.png.*.tmp`` file (or a checkpoint's temp
    folder) that a write in progress had made. Only in the main thread (the only one signal handlers can be set in),
    and not where SIGTERM is ignored (the parent process asked for that)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous))


@app.callback()
def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """tokensparse: faster reference-conditioned diffusion transformers."""
    exit_on_sigterm(ctx)


@show_app.command("models")
def show_models() -> None:
    """List the named RefDiT models and whether trained weights ship."""
    from .models import list_models

    table = Table(title="RefDiT models",
                  caption="K/V cache: references do not attend to the target (ref_attends_target=False), so "
                          "SparseContextConfig(cache=True) applies")
    table.add_column("name", no_wrap=True)  # names are what a user types: never cut
    for col in ("image", "patch", "dim", "depth", "K/V cache", "weights"):
        table.add_column(col)
    for name, info in list_models().items():
        c = info["config"]
        table.add_row(name, str(c["image_size"]), str(c["patch_size"]), str(c["dim"]), str(c["depth"]),
                      "-" if c["ref_attends_target"] else "yes", "shipped" if info["weights"] else "-")
    console.print(table)


@show_app.command("tasks")
def show_tasks(out: Path = typer.Option(Path("tasks.png"), help="PNG to write (replaced if it exists)."),
               image_size: int = typer.Option(32, help="Image size of the samples (a multiple of 8 in [16, 256])."),
               per_task: int = typer.Option(3, help="Samples per task.")) -> None:
    """Draw a grid of task-suite samples: references | prompt | target, per task."""
    from .data import save_task_grid

    check_png_out(out)
    try:
        save_task_grid(out, image_size=image_size, per_task=per_task)
    except (ValueError, OSError) as exc:  # OSError: the PNG could not be written
        fail(flag_names(str(exc), ("image_size", "per_task")))
    console.print(f"wrote {out}")


@show_app.command("selection")
def show_selection(
    ref: list[Path] = typer.Option(..., "--ref", exists=True, dir_okay=False, help="Reference image (repeat)."),
    selector: str = typer.Option("auto", help="Scorer name (see tokensparse.selection.SCORERS)."),
    keep: float = typer.Option(0.25, help="Average fraction of reference tokens kept (with --adaptive: the most "
                               "each reference keeps)."),
    out: Path = typer.Option(Path("selection.png"), help="PNG to write (replaced if it exists)."),
    prompt: str | None = typer.Option(None, help="Prompt (selector=auto reads its task; attention probes with it)."),
    adaptive: bool = typer.Option(False, help="Adaptive per-reference budget (up to --keep)."),
    model: str | None = typer.Option(None, help="Shipped RefDiT name or checkpoint path: its token grid "
                                     "(default: 32 px, 4 px patches), and the probe of selector=attention, which "
                                     "needs one."),
) -> None:
    """Draw the kept reference tokens over each reference image."""
    from .selection import needs_probe
    from .show_selection import save_selection_map

    check_png_out(out)
    check_out_not_ref(out, list(ref))
    if model is not None and not model.strip():  # Path("") is the current folder: " is a folder" would follow
        fail("--model must name a shipped RefDiT (tokensparse show models) or a checkpoint path, got an empty string")
    if model is None and needs_probe(selector):  # the Python API's message names its model= argument
        fail(f"--selector {selector} probes a model's attention: give --model refdit-sparse (or a checkpoint path)")
    try:
        with large_images_named("reference image"):
            save_selection_map(list(ref), selector, keep, out, prompt=prompt, adaptive=adaptive, model=model)
    except (ValueError, OSError) as exc:  # OSError: unreadable image, missing checkpoint
        fail(flag_names(str(exc), ("selector", "keep", "prompt", "model")))
    console.print(f"wrote {out}")


@app.command()
def demo(out: Path = typer.Option(Path("tokensparse_demo.png"), help="Where to write the demo PNG (replaced if it "
                                  "exists)."),
         steps: int = typer.Option(20, help="Denoising steps.")) -> None:
    """Run a dense and a sparse generation side by side and write a PNG."""
    from .demo import run_demo
    from .flow import MAX_STEPS

    check_png_out(out)
    if steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    if steps > MAX_STEPS:  # generate refuses it, but only after the model loads and the warm-up runs: a traceback
        fail(f"--steps must be at most {MAX_STEPS:,}, got {steps}")
    try:
        run_demo(out=out, steps=steps, console=console)
    except OSError as exc:  # the PNG could not be written (save_png names it)
        fail(str(exc))


@app.command()
def train(
    config: Path = typer.Option(..., exists=True, dir_okay=False, help="Recipe JSON (see recipes/)."),
    out: str | None = typer.Option(None, help="Run folder (overrides the recipe's; default for a run folder's own "
                                   "config.json: that folder); resumes if it has checkpoints."),
    steps: int | None = typer.Option(None, help="Override the recipe's step count."),
    max_minutes: float | None = typer.Option(None, help="Stop and checkpoint once the run has trained this many "
                                             "minutes in all (earlier sessions of a resumed run count)."),
    export: Path | None = typer.Option(None, help="After training, write the EMA weights here (.safetensors, and its "
                                        ".json beside it: not over the run's config.json or in a step_* folder; "
                                        "both replaced if they exist)."),
    half: bool = typer.Option(False, help="Store exported weights in float16."),
) -> None:
    """Train or fine-tune RefDiT. Several CPU processes: `torchrun --nproc_per_node 2 -m tokensparse.cli train
    ...` (or `accelerate launch --multi_gpu --num_processes 2 -m tokensparse.cli train ...`; accelerate's
    `--cpu` launches one process); GPUs: `accelerate launch -m tokensparse.cli train ...`."""
    import json

    from .extras import MissingExtraError
    from .train import TrainConfig, export_conflict, export_ema, init_path, latest_checkpoint
    from .train import train as run_training

    if half and export is None:  # nothing else is stored in float16: without --export it would do nothing
        fail("--half sets the dtype of the --export weights; give --export PATH.safetensors too")
    if out is None and config.name == "config.json" and latest_checkpoint(config.parent) is not None:
        out = str(config.parent)  # a run folder's own config resumes that run (its out may be relative to elsewhere)
    flags = {key: value for key, value in (("out", out), ("steps", steps), ("max_minutes", max_minutes))
             if value is not None}  # a str --out: Path('') would be '.', and TrainConfig refuses an empty out
    try:
        raw = json.loads(config.read_text(encoding="utf-8-sig"))  # -sig: a BOM (Notepad) is no error
        if not isinstance(raw, dict):
            raise ValueError("must be a JSON object")
        cfg = TrainConfig.from_dict({**raw, **flags})
    except UnicodeDecodeError:  # a PNG, a checkpoint: it said "'utf-8' codec can't decode byte 0x89 ..."
        fail(f"recipe {config} is not a text file: give a JSON recipe (see recipes/)")
    except (ValueError, TypeError) as exc:  # bad JSON, an unknown field, a value out of range
        fail(_recipe_error(config, exc, flags))
    resuming = latest_checkpoint(Path(cfg.out)) is not None
    if cfg.init is not None and not resuming and not init_path(cfg.init).exists():
        fail(f"recipe {config}: init {cfg.init} not found (a checkpoint, a run folder or a shipped model's name)")
    check_out(Path(cfg.out), None, "--out" if out is not None else f"recipe {config}: out")
    if export is not None:
        if cfg.stop_at == 0 and not resuming:  # known now: the run would stop before its first step, saving nothing
            fail(f"nothing to export: recipe {config} has stop_at 0, which stops a new run before its first step, so "
                 f"run folder {cfg.out} would hold no checkpoint; give stop_at >= 1 (or leave it out) to --export")
        check_out(export, ".safetensors", "--export")
        if export.with_suffix(".json").is_dir():  # found only after training, by the rename of the JSON
            fail(f"--export {export}: its metadata {export.with_suffix('.json')} is a folder; export elsewhere")
        if export.with_suffix(".json").resolve() == config.resolve():
            fail(f"--export {export} would write its metadata over the recipe {config}; export elsewhere")
        conflict = export_conflict(cfg.out, export)
        if conflict is not None:
            fail(f"--export {export}: {conflict}; export elsewhere")
    try:
        state = run_training(cfg, log=console.print).state
    except ValueError as exc:  # a bad init, another recipe or architecture in the run folder, a diverged loss
        fail(_recipe_error(config, exc, flags))
    except MissingExtraError as exc:  # no accelerate (or peft, for a LoRA recipe): the message names the extra
        fail(str(exc))
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one process reports and exports (training waited for the save)
        return
    console.print(f"stopped at step {state['step']} after {state['elapsed_s'] / 60:.1f} min")
    if export is not None:
        import torch

        if latest_checkpoint(Path(cfg.out)) is None:  # stopped before its first step (stop_at 0, no time left)
            fail(f"nothing to export: run folder {cfg.out} has no checkpoint yet")
        try:
            export_ema(cfg.out, export, dtype=torch.float16 if half else torch.float32)
        except OSError as exc:  # disk full, a folder that vanished: the run folder keeps its checkpoints
            fail(f"--export: {exc}")
        console.print(f"wrote {export}")


def _recipe_error(config: Path, exc: Exception, flags: dict) -> str:
    """How ``train`` reports ``exc``: naming the flag where it is about a value one of ``flags`` set (--steps 0),
    else as the recipe's."""
    message = flag_names(str(exc), flags)
    return message if message != str(exc) else f"recipe {config}: {exc}"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": ["--help"]})
def bench(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="speed | quality | selection | guidance | merging | drop_sweep | flux_speed "
                               "| data_speed"),
    quick: bool = typer.Option(False, help="The benchmark's quick variant (minutes, small samples)."),
    out: Path | None = typer.Option(None, help="JSON to write, replaced if it exists (default: "
                                    "benchmarks/results/NAME.json; with "
                                    "--quick NAME_quick.json, so a smoke run keeps the committed results)."),
) -> None:
    """Run a benchmark script from a repository checkout; it writes its JSON (and, all but drop_sweep,
    flux_speed and data_speed, a PNG plot) under benchmarks/results. Other flags go to the script as typed
    (`tokensparse bench quality --n 32 --steps 10`; `tokensparse bench quality -h` lists them, as --help shows
    this help)."""
    from .bench import run_benchmark

    if name == "-h":  # `tokensparse bench -h`: no benchmark named yet, so this help (-h after NAME is the script's)
        typer.echo(ctx.get_help())
        raise typer.Exit()
    if out is not None:
        check_out(out, ".json")
    try:
        code = run_benchmark(name, quick=quick, out=out.resolve() if out else None, console=console,
                             extra=list(ctx.args))
    except (ValueError, FileNotFoundError) as exc:  # an unknown name, no checkout: a usage error (exit 2)
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    if code:
        raise typer.Exit(code=code)


def _register_diffusers_commands() -> None:
    from .cli_diffusers import generate, train_lora

    app.command("generate")(generate)
    app.command("train-lora")(train_lora)


_register_diffusers_commands()


def _reflowed(doc: str) -> str:
    """A command's docstring as its --help shows it: paragraphs (split at blank lines) each on one line, so that
    rich wraps them at the terminal's width (typer keeps a single line break after the first paragraph, which broke
    sentences mid-line)."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _reflow_help(*apps: typer.Typer) -> None:
    """Give every command of ``apps`` its reflowed docstring (:func:`_reflowed`) as help, where it sets none."""
    for typer_app in apps:
        for info in typer_app.registered_commands:
            doc = info.help or inspect.getdoc(info.callback)
            if doc:
                info.help = _reflowed(doc)


_reflow_help(app, show_app)


def main() -> None:  # pragma: no cover
    """The ``tokensparse`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

"""Command line: ``tokensparse demo | show | train | generate | bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="tokensparse: faster reference-conditioned diffusion transformers.", no_args_is_help=True,
                  add_completion=False)
show_app = typer.Typer(help="Show models, tasks and selections.", no_args_is_help=True)
app.add_typer(show_app, name="show")
console = Console()


@show_app.command("models")
def show_models() -> None:
    """List the named RefDiT models and whether trained weights ship."""
    from .models import list_models

    table = Table(title="RefDiT models")
    for col in ("name", "image", "patch", "dim", "depth", "ref_attends_target", "weights"):
        table.add_column(col)
    for name, info in list_models().items():
        c = info["config"]
        table.add_row(name, str(c["image_size"]), str(c["patch_size"]), str(c["dim"]), str(c["depth"]),
                      str(c["ref_attends_target"]), "shipped" if info["weights"] else "-")
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("tokensparse_demo.png"), help="Where to write the demo PNG."),
         steps: int = typer.Option(20, help="Denoising steps.")) -> None:
    """Run a dense and a sparse generation side by side and write a PNG."""
    from .demo import run_demo

    run_demo(out=out, steps=steps, console=console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

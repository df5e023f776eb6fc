"""``tokensparse bench NAME``: run one of the repository's benchmark scripts with a live progress display.

The scripts live outside the package, in a source checkout's ``benchmarks/`` folder (they write JSON and PNG
under ``benchmarks/results/``), so this command works from a clone of the repository.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

PROGRESS_LINE = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")  # what benchmarks/common.py's progress() prints
BENCHMARKS: dict[str, str] = {
    "speed": "speed.py",
    "quality": "quality.py",
    "selection": "selection.py",
    "guidance": "guidance.py",
    "merging": "merging.py",
    "drop_sweep": "drop_sweep.py",
    "flux_speed": "flux_speed.py",
    "data_speed": "data_speed.py",
}


def find_script(name: str, root: Path | None = None) -> Path:
    """The benchmark script for ``name``: under ``root/benchmarks``, else in the checkout this package was
    installed from (editable installs), else in the current directory's ``benchmarks/``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    roots = [root] if root is not None else [Path(__file__).resolve().parents[2], Path.cwd()]
    for r in roots:
        path = r / "benchmarks" / BENCHMARKS[name]
        if path.is_file():
            return path
    where = " or ".join(str(r / "benchmarks") for r in roots)
    raise FileNotFoundError(f"benchmark script {BENCHMARKS[name]} not found in {where}; "
                            "`tokensparse bench` runs from a clone of the tokensparse repository")


@contextlib.contextmanager
def _termination_raises() -> Iterator[None]:
    """While inside, a SIGTERM of this process raises ``SystemExit(143)`` like Ctrl-C raises ``KeyboardInterrupt``
    (so a ``kill`` stops the benchmark it runs too); outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_benchmark(name: str, quick: bool = False, out: Path | None = None, console: Console | None = None,
                  extra: list[str] | None = None, root: Path | None = None) -> int:
    """Run benchmark ``name`` (``--quick``, ``--out``, then ``extra``: the script's own flags) in a subprocess in
    the current directory (relative paths in ``extra`` are read from it); its exit code.

    The script's ``[done/total] what`` lines drive a progress bar; every other line is printed as it comes. On a
    console that is not an interactive terminal (a pipe, a file, a log) there is no bar: the other lines as they
    come, then one summary line (``bench NAME: done, 3/3 stages, 0:01:05``; no stage count for a script that
    announces none).
    """
    console = console or Console()
    live = console.is_interactive  # else rich would print the bar's last frame, spinner and ``0/?`` included
    script = find_script(name, root)
    cmd = [sys.executable, str(script), *(["--quick"] if quick else []), *(["--out", str(out)] if out else []),
           *(extra or [])]
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console,
                  disable=not live) as progress:
        task = progress.add_task(f"bench {name}", last="starting", total=None)
        with _termination_raises():  # a kill stops the benchmark as Ctrl-C does (from before it starts)
            # run where the user typed the command: relative paths in the script's flags (--sparse my/w.safetensors)
            # mean what they typed (the scripts find the checkout's files from their own path)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    line = line.rstrip()
                    step = PROGRESS_LINE.match(line)
                    if step:
                        done, total, what = int(step[1]), int(step[2]), step[3]
                        progress.update(task, completed=done, total=total, last=what[:50])
                    elif line:
                        progress.console.print(line, markup=False, highlight=False, soft_wrap=True)  # no re-wrapping
                        progress.update(task, last=line[:50])
            except BaseException:  # Ctrl-C or SIGTERM of this process: stop the benchmark too, not at its next print
                try:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)  # the script's own clean-up runs (no partial JSON)
                        proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                finally:  # also when a second Ctrl-C / SIGTERM cuts the wait short: never leave it running
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                raise
        code = proc.wait()
        if code < 0:  # killed by signal N: report it the way a shell does
            code = 128 - code
        total = progress.tasks[0].total
        if code == 0 and total:  # the scripts announce a stage as it starts: a finished run completed them all
            progress.update(task, completed=total)
        progress.update(task, last="done" if code == 0 else f"failed (exit {code})")
    if not live:
        console.print(_summary(name, progress.tasks[0].fields["last"], int(progress.tasks[0].completed), total,
                               progress.tasks[0].elapsed), markup=False, highlight=False, soft_wrap=True)
    return code


def _summary(name: str, outcome: str, done: int, total: float | None, elapsed: float | None) -> str:
    """The one line a non-interactive ``bench`` ends with: ``bench NAME: OUTCOME[, DONE/TOTAL stages], H:MM:SS``."""
    stages = f", {done}/{int(total)} stages" if total else ""
    return f"bench {name}: {outcome}{stages}, {datetime.timedelta(seconds=int(elapsed or 0))}"

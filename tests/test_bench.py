from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokensparse.bench import BENCHMARKS, find_script, run_benchmark
from tokensparse.cli import app


def test_every_benchmark_name_maps_to_a_script_name():
    assert set(BENCHMARKS) == {"speed", "quality", "selection", "guidance", "merging", "drop_sweep",
                               "flux_speed", "data_speed"}


def test_unknown_benchmark_is_a_value_error():
    with pytest.raises(ValueError, match="unknown benchmark 'fast'"):
        find_script("fast")


def test_missing_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="clone of the tokensparse repository"):
        find_script("speed", root=tmp_path)


def test_runs_the_script_and_returns_its_exit_code(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "speed.py"
    script.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    assert find_script("speed", root=tmp_path) == script
    out = tmp_path / "x.json"
    assert run_benchmark("speed", quick=True, out=out, root=tmp_path) == 3


def test_the_scripts_flags_read_relative_paths_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "checkout" / "benchmarks").mkdir(parents=True)
    (tmp_path / "checkout" / "benchmarks" / "speed.py").write_text(
        "import sys\nfrom pathlib import Path\nsys.exit(0 if Path(sys.argv[-1]).is_file() else 4)\n")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "w.safetensors").write_text("")
    monkeypatch.chdir(tmp_path / "here")  # `tokensparse bench speed --model w.safetensors` typed here
    assert run_benchmark("speed", extra=["--model", "w.safetensors"], root=tmp_path / "checkout") == 0


def test_cli_reports_unknown_name():
    res = CliRunner().invoke(app, ["bench", "fast"])
    assert res.exit_code == 2 and "unknown benchmark" in res.stderr and not res.stdout


def test_repository_ships_the_scripts_it_names():
    root = Path(__file__).resolve().parents[1]
    present = {n for n, f in BENCHMARKS.items() if (root / "benchmarks" / f).is_file()}
    assert set(BENCHMARKS) == present


def test_progress_lines_drive_the_bar_and_are_not_echoed(tmp_path):
    import io

    from rich.console import Console

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "quality.py").write_text(
        "print('[0/2] base', flush=True)\nprint('hello', flush=True)\nprint('[2/2] done', flush=True)\n")
    buf = io.StringIO()
    assert run_benchmark("quality", console=Console(file=buf, width=120), root=tmp_path) == 0
    out = buf.getvalue()
    assert "hello" in out and "[0/2]" not in out and "2/2" in out


def test_long_lines_are_not_rewrapped_and_a_finished_run_shows_every_stage(tmp_path):
    import io

    from rich.console import Console

    (tmp_path / "benchmarks").mkdir()
    long = "x" * 150
    (tmp_path / "benchmarks" / "speed.py").write_text(f"print('[0/3] a', flush=True)\nprint('{long}', flush=True)\n")
    buf = io.StringIO()
    assert run_benchmark("speed", console=Console(file=buf, width=80), root=tmp_path) == 0
    out = buf.getvalue()
    assert long in out and "3/3" in out  # one line, not wrapped at 80 columns; the bar ends full


def test_the_installed_checkout_wins_over_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "speed.py").write_text("")
    monkeypatch.chdir(tmp_path)
    assert find_script("speed") == Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_a_benchmark_script_refuses_an_out_that_is_not_a_json_file_before_working(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "selection.py"
    (tmp_path / "afile").write_text("")
    for out, message in ((tmp_path / "sel.png", "must be a .json path"), (tmp_path, "must be a .json path"),
                         (tmp_path / "d.json", "is a folder"), (tmp_path / "afile" / "s.json", "is a file")):
        if out.name == "d.json":
            out.mkdir()
        res = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr, (out, res.stderr[-300:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.json"]  # nothing written


def test_an_interrupted_bench_stops_its_benchmark_and_signals_read_like_a_shell(tmp_path):
    import io
    import os

    from rich.console import Console

    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "speed.py"
    pid_file = tmp_path / "pid"
    script.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      "print('working', flush=True)\ntime.sleep(60)\n")

    class Interrupting(Console):
        def print(self, *args, **kwargs):  # Ctrl-C arrives while the benchmark runs
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_benchmark("speed", root=tmp_path, console=Interrupting(file=io.StringIO()))
    with pytest.raises(ProcessLookupError):  # the benchmark is gone too (and was reaped)
        os.kill(int(pid_file.read_text()), 0)
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    assert run_benchmark("speed", root=tmp_path, console=Console(file=io.StringIO())) == 128 + 15


def _start_bench(tmp_path, prelude: str):
    """Start ``run_benchmark('speed')`` in a subprocess on a fake 60-second benchmark (``prelude`` runs first);
    returns the bench process and the file holding the benchmark's pid, once the benchmark is running."""
    import subprocess
    import sys
    import time

    (tmp_path / "benchmarks").mkdir()
    pid_file = tmp_path / "pid"
    (tmp_path / "benchmarks" / "speed.py").write_text(
        f"{prelude}import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('working', flush=True)\ntime.sleep(60)\n")
    runner = (f"from pathlib import Path\nfrom tokensparse.bench import run_benchmark\n"
              f"run_benchmark('speed', root=Path({str(tmp_path)!r}))\n")
    bench = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the runner is reading the benchmark's output
    return bench, pid_file


def _assert_gone(pid: int, seconds: float, message: str) -> None:
    """Poll until process ``pid`` (not our child) is gone; kill it and fail with ``message`` after ``seconds``."""
    import os
    import signal
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(message)


def test_a_killed_bench_stops_its_benchmark_too(tmp_path):
    import signal

    bench, pid_file = _start_bench(tmp_path, "")
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM  # like a shell's report of a terminated command
    _assert_gone(int(pid_file.read_text()), 10.0, "the benchmark outlived its killed bench")


def test_a_second_kill_during_the_clean_up_wait_still_stops_the_benchmark(tmp_path):
    import signal
    import time

    # the benchmark ignores the SIGINT bench sends, so bench waits up to 30 s for its clean-up
    bench, pid_file = _start_bench(tmp_path, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n")
    bench.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # bench is now waiting for the benchmark's clean-up
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=20) == 128 + signal.SIGTERM
    _assert_gone(int(pid_file.read_text()), 5.0, "a second SIGTERM left the benchmark running")  # was: re-parented


def test_count_flags_are_refused_naming_the_flag_before_any_work(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    cases = [("speed.py", ["--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
             ("flux_speed.py", ["--repeats", "x"], "argument --repeats: expected an integer >= 1, got 'x'"),
             ("quality.py", ["--n", "0"], "argument --n: expected an integer >= 1"),
             ("guidance.py", ["--n", "1"], "argument --n: expected an integer >= 2"),
             ("flux_flops.py", ["--max-refs", "0"], "argument --max-refs: expected an integer >= 1")]
    for script, argv, message in cases:  # were: a traceback (no median of nothing) or a JSON without rows
        res = subprocess.run([sys.executable, str(root / script), *argv, "--out", str(tmp_path / "r.json")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr, (script, res.stderr[-300:])
    assert list(tmp_path.iterdir()) == []


def test_cli_passes_the_scripts_own_flags_through(monkeypatch, tmp_path):
    import tokensparse.bench as bench

    seen = {}
    monkeypatch.setattr(bench, "run_benchmark", lambda name, **kw: seen.update(name=name, **kw) or 0)
    res = CliRunner().invoke(app, ["bench", "quality", "--quick", "--n", "32", "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert seen["name"] == "quality" and seen["quick"] and seen["extra"] == ["--n", "32", "--steps", "4"]  # was: exit 2


def test_a_flag_the_script_does_not_know_is_its_usage_error(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "quality.py").write_text(
        "import argparse\nap = argparse.ArgumentParser()\nap.add_argument('--n', type=int)\nap.parse_args()\n")
    assert run_benchmark("quality", extra=["--n", "3"], root=tmp_path) == 0
    assert run_benchmark("quality", extra=["--nope"], root=tmp_path) == 2


def test_bench_help_names_the_way_to_the_scripts_own_flags():
    res = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert "tokensparse bench quality -h" in " ".join(res.output.split())  # `bench quality --help`: this help
    res = CliRunner().invoke(app, ["bench", "data_speed", "-h"])
    assert res.exit_code == 0 and "usage: data_speed.py" in res.output, res.output


def test_off_a_terminal_bench_ends_with_one_summary_line_not_the_bars_last_frame(tmp_path):
    import io

    from rich.console import Console

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "data_speed.py").write_text("print('hello', flush=True)\n")  # announces no stage
    (tmp_path / "benchmarks" / "speed.py").write_text(
        "import sys\nprint('[0/3] a', flush=True)\nprint('[1/3] b', flush=True)\nsys.exit(3)\n")
    buf = io.StringIO()
    assert run_benchmark("data_speed", console=Console(file=buf, width=80), root=tmp_path) == 0
    lines = buf.getvalue().splitlines()
    assert lines[0] == "hello" and lines[1].startswith("bench data_speed: done, 0:00:0"), lines  # was: ⠧ ... 0/? done
    assert len(lines) == 2 and "?" not in buf.getvalue() and "━" not in buf.getvalue()
    buf = io.StringIO()
    assert run_benchmark("speed", console=Console(file=buf, width=80), root=tmp_path) == 3
    assert buf.getvalue().startswith("bench speed: failed (exit 3), 1/3 stages, 0:00:0"), buf.getvalue()


def test_on_a_terminal_bench_still_draws_its_bar(tmp_path):
    import io

    from rich.console import Console

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "speed.py").write_text("print('[0/3] a', flush=True)\n")
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, force_interactive=True)
    assert run_benchmark("speed", console=console, root=tmp_path) == 0
    assert "3/3" in buf.getvalue() and "━" in buf.getvalue() and "bench speed:" not in buf.getvalue()

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokensparse.bench import BENCHMARKS, find_script, run_benchmark
from tokensparse.cli import app


def test_every_benchmark_name_maps_to_a_script_name():
    assert set(BENCHMARKS) == {"speed", "quality", "selection", "guidance", "merging", "drop_sweep",
                               "flux_speed"}


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


def test_cli_reports_unknown_name():
    res = CliRunner().invoke(app, ["bench", "fast"])
    assert res.exit_code == 2 and "unknown benchmark" in res.stderr and not res.stdout


def test_repository_ships_the_scripts_it_names():
    root = Path(__file__).resolve().parents[1]
    present = {n for n, f in BENCHMARKS.items() if (root / "benchmarks" / f).is_file()}
    assert {"speed", "quality", "selection", "merging", "drop_sweep"} <= present


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


def test_results_and_plot_are_replaced_together_and_a_failed_plot_keeps_the_results(tmp_path):
    import json

    from matplotlib.figure import Figure

    common = _script("common")
    plt = common.pyplot()
    out = tmp_path / "speed.json"
    figs = []

    def plot():
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 2])
        figs.append(fig)
        return fig

    common.write_json(out, {"summary": {"x": 1}}, plot)
    assert json.loads(out.read_text())["summary"] == {"x": 1}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(figs[0].number)  # closed after writing
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    class Interrupted(Figure):  # Ctrl-C while the plot renders
        def savefig(self, path, **kwargs):
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.write_json(out, {"summary": {"x": 2}}, Interrupted)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the old pair, and no temp files

    def broken():
        raise ValueError("no data to plot")

    with pytest.raises(RuntimeError, match="its plot failed"):
        common.write_json(out, {"summary": {"x": 3}}, broken)
    assert json.loads(out.read_text())["summary"] == {"x": 3}  # the results are kept, the stale plot removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json"]


def _script(name: str):
    """A benchmark script as a module (``benchmarks/`` on the path for its ``common`` import)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", root / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(root))
    return mod


@pytest.mark.parametrize("argv, expected", [(["--quick"], 3), ([], 9), (["--repeats", "2"], 2)])
def test_speed_records_the_repeats_its_medians_were_taken_over(tmp_path, monkeypatch, argv, expected):
    speed = _script("speed")
    used, written = [], {}

    def fake_run(arch, n_refs_list, settings, repeats, steps, stage=(0, 1)):
        used.append(repeats)
        return [{"arch": arch, "refs": n, "setting": s, "speedup": 1.0, "efficiency": 1.0}
                for n in n_refs_list for s in settings]

    monkeypatch.setattr(speed, "run", fake_run)
    monkeypatch.setattr(speed, "write_json", lambda path, payload, plot=None, dpi=110: written.update(payload))
    monkeypatch.setattr("sys.argv", ["speed.py", *argv, "--out", str(tmp_path / "s.json")])
    speed.main()
    assert set(used) == {expected} and written["repeats"] == expected  # --quick used 3 but recorded the default


def test_guidance_ends_its_progress_on_its_own_stage_count(tmp_path, monkeypatch, capsys):
    guidance = _script("guidance")
    monkeypatch.setattr(guidance, "write_json", lambda *args, **kwargs: None)
    guidance.finish({}, tmp_path / "g.json", {"cfg_best_fid": 1.0}, 13)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[13/13] done"  # was "[1/1] done": the bar's total jumped from 13 to 1 at the end


def test_readme_tables_help_and_unknown_options_neither_print_tables_nor_touch_the_readme(monkeypatch, capsys):
    tables = _script("readme_tables")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    before = readme.read_bytes()
    for argv, code in ((["--help"], 0), (["--wirte"], 2)):
        monkeypatch.setattr("sys.argv", ["readme_tables.py", *argv])
        with pytest.raises(SystemExit) as exc:
            tables.main()
        out = capsys.readouterr()
        assert exc.value.code == code and "usage:" in out.out + out.err and "| keep |" not in out.out
    assert readme.read_bytes() == before  # was: --help printed the tables, a mistyped --write printed them too


def test_recipe_search_prints_a_quality_summary_that_nests_per_model(tmp_path, monkeypatch, capsys):
    import json

    search = _script("recipe_search")
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"v1": {}}))
    summary = {"ft_gain_db_keep025": {"editing": 1.234},
               "proportional_gain_db_keep025": {"base": {"editing": 0.456}, "sparse": {"editing": 0.789}}}

    class Done:
        def wait(self) -> int:
            return 0

    monkeypatch.setattr(search, "run_pipeline", lambda *args: Done())
    monkeypatch.setattr(search, "collect", lambda name, root: {"base_steps": 20, "sparse_steps": 20,
                                                                "summary": summary})
    monkeypatch.setattr(search, "write_json", lambda *args, **kwargs: None)
    monkeypatch.setattr("sys.argv", ["recipe_search.py", "--quick", "--variants", str(variants), "--device", "cpu",
                                     "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
    search.main()  # was a TypeError (round() of the per-model dict) after the JSON was written: exit 1
    out = capsys.readouterr().out
    assert "'base': {'editing': 0.46}" in out and "'editing': 1.23" in out


def test_recipe_search_quick_runs_apart_from_full_runs(tmp_path, monkeypatch):
    search = _script("recipe_search")
    variants = tmp_path / "variants.json"
    variants.write_text('{"v1": {}}')
    roots = []

    class Done:
        def wait(self) -> int:
            return 0

    monkeypatch.setattr(search, "run_pipeline", lambda name, spec, root, *args: roots.append(root) or Done())
    monkeypatch.setattr(search, "collect", lambda name, root: {})
    monkeypatch.setattr(search, "write_json", lambda *args, **kwargs: None)
    for quick in (["--quick"], []):
        monkeypatch.setattr("sys.argv", ["recipe_search.py", *quick, "--variants", str(variants), "--device", "cpu",
                                         "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
        search.main()
    assert roots == [tmp_path / "runs" / "quick", tmp_path / "runs"]  # was: --quick resumed the full runs' stages


def test_drop_sweep_reads_the_shipped_base_from_any_directory(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    sweep = _script("drop_sweep")
    assert Path(sweep.BASE).is_absolute() and Path(sweep.BASE).is_file()  # was relative to the repository root


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


@pytest.mark.parametrize("argv, message", [
    (["--selectors", "random,nope"], "--selectors takes a comma list of"),
    (["--selectors", ""], "--selectors takes a comma list of"),
    (["--families", "editing,typo"], "--families takes a comma list of"),
    (["--keeps", "0.25,abc"], "--keeps takes a comma list of numbers"),
    (["--masses", "1.5"], "--masses takes a comma list of numbers in (0, 1]"),
])
def test_selection_refuses_bad_lists_before_the_dense_runs(tmp_path, monkeypatch, capsys, argv, message):
    selection = _script("selection")
    monkeypatch.setattr(selection, "load", lambda spec: pytest.fail("loaded a model before checking the flags"))
    monkeypatch.setattr("sys.argv", ["selection.py", *argv, "--out", str(tmp_path / "s.json")])
    with pytest.raises(SystemExit) as exc:
        selection.main()  # --selectors nope was a KeyError after the dense runs of every family
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--cfg-scales", "1.5,x"], "--cfg-scales takes a comma list of numbers"),
    (["--sg-gammas", "0.5"], "--sg-gammas takes a comma list of strong/weak pairs"),
    (["--sg-gammas", "0.9/0.5"], "0 <= strong <= weak < 1"),
])
def test_guidance_refuses_bad_lists_before_loading(tmp_path, monkeypatch, capsys, argv, message):
    guidance = _script("guidance")
    monkeypatch.setattr(guidance, "load", lambda spec: pytest.fail("loaded a model before checking the flags"))
    monkeypatch.setattr("sys.argv", ["guidance.py", *argv, "--out", str(tmp_path / "g.json")])
    with pytest.raises(SystemExit) as exc:
        guidance.main()
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_guidance_quick_keeps_cfg_rows_for_a_short_scale_list():
    guidance = _script("guidance")
    names = list(guidance.configs(True, cfg_scales=(1.5,), sg_gammas=((0.0, 0.5),)))
    assert "cfg w=1.5" in names  # was: none, and min() of no CFG rows failed after the whole FID sweep
    assert [n for n in guidance.configs(True) if n.startswith("cfg ")] == ["cfg w=1.5", "cfg w=2.0"]  # as before


@pytest.mark.parametrize("content, message", [
    (None, "--variants"), ("{not json", "cannot read it as JSON"), ('["r0"]', "must hold a JSON object"),
    ('{"a": {}, "b": {"base_from": "typo"}}', "b's base_from 'typo' must name another variant"),
])
def test_recipe_search_refuses_a_bad_variants_file_before_starting_pipelines(tmp_path, monkeypatch, capsys,
                                                                             content, message):
    search = _script("recipe_search")
    variants = tmp_path / "variants.json"
    if content is not None:
        variants.write_text(content)
    monkeypatch.setattr(search, "run_pipeline", lambda *args: pytest.fail("started a pipeline"))
    monkeypatch.setattr("sys.argv", ["recipe_search.py", "--variants", str(variants), "--device", "cpu",
                                     "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as exc:
        search.main()  # was a FileNotFoundError / JSONDecodeError traceback, or a 30-minute wait for "typo"
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_cuda_device_is_refused_where_there_is_none(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quality = _script("quality")
    monkeypatch.setattr(quality, "load", lambda spec: pytest.fail("loaded a model before checking --device"))
    for device, message in (("cuda", "--device cuda: no CUDA device is available"),
                            ("gpu0", "--device must be a torch device")):
        monkeypatch.setattr("sys.argv", ["quality.py", "--device", device, "--out", str(tmp_path / "q.json")])
        with pytest.raises(SystemExit) as exc:
            quality.main()
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_recipe_search_exits_non_zero_when_a_pipeline_failed_and_keeps_the_others_results(tmp_path, monkeypatch):
    search = _script("recipe_search")
    variants = tmp_path / "variants.json"
    variants.write_text('{"ok": {}, "broken": {}}')
    written = {}

    class Exited:
        def __init__(self, code: int) -> None:
            self.code = code

        def wait(self) -> int:
            return self.code

    monkeypatch.setattr(search, "run_pipeline", lambda name, *args: Exited(1 if name == "broken" else 0))
    monkeypatch.setattr(search, "collect", lambda name, root: {"summary": {"x": 1.0}} if name == "ok" else {})
    monkeypatch.setattr(search, "write_json", lambda path, payload, plot=None: written.update(payload))
    monkeypatch.setattr("sys.argv", ["recipe_search.py", "--variants", str(variants), "--device", "cpu",
                                     "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as exc:
        search.main()  # was: exit 0, as if every pipeline had finished
    assert "failed pipelines: broken" in str(exc.value.code) and written["variants"]["ok"] == {"summary": {"x": 1.0}}


def test_selection_quick_sweeps_the_default_adaptive_mass_so_its_summary_is_complete(tmp_path, monkeypatch):
    from types import SimpleNamespace

    selection = _script("selection")
    written, masses = {}, []

    def fake_run(model, cfg, samples, steps):
        if cfg is not None and cfg.adaptive:
            masses.append(cfg.mass)
        kept = 1.0 if cfg is None else 0.2 if cfg.adaptive else cfg.keep
        return {"psnr": {"mean": 20.0 + kept}, "kept_frac": kept}

    monkeypatch.setattr(selection, "load", lambda spec: SimpleNamespace(
        config=SimpleNamespace(image_size=32, ref_attends_target=False)))
    monkeypatch.setattr(selection, "heldout_by_family", lambda n, size: {f: [] for f in selection.FAMILIES})
    monkeypatch.setattr(selection, "run", fake_run)
    monkeypatch.setattr(selection, "write_json", lambda path, payload, plot=None, dpi=110: written.update(payload))
    monkeypatch.setattr("sys.argv", ["selection.py", "--quick", "--skip-overhead", "--out", str(tmp_path / "s.json")])
    selection.main()
    assert selection.ts.SparseContextConfig().mass in masses  # was 0.8 and 0.95 only: no taskaware_adaptive_* keys
    assert {"taskaware_adaptive_drop_db", "taskaware_adaptive_kept_frac"} <= set(written["summary"])


def test_default_results_go_to_the_checkout_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = _script("common")
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    assert common.results_path("speed", False) == results / "speed.json"  # was relative: ./benchmarks/results
    assert common.results_path("speed", True) == results / "speed_quick.json"
    monkeypatch.setattr("sys.argv", ["speed.py", "--quick"])
    assert common.parser(None, "speed", "quick").parse_args().out == results / "speed_quick.json"
    assert not (tmp_path / "benchmarks").exists()


@pytest.mark.parametrize("content", ["{truncated", "[1, 2]"])
def test_merging_refuses_an_existing_out_it_cannot_keep_parts_from(tmp_path, monkeypatch, capsys, content):
    merging = _script("merging")
    out = tmp_path / "m.json"
    out.write_text(content)
    monkeypatch.setattr(merging, "primitives", lambda quick: pytest.fail("ran a part"))
    monkeypatch.setattr("sys.argv", ["merging.py", "--quick", "--part", "primitives", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        merging.main()  # was a JSONDecodeError / AttributeError traceback
    assert exc.value.code == 2 and f"--out {out} exists but is not a results JSON" in capsys.readouterr().err
    assert out.read_text() == content


def test_readme_tables_check_reports_drift_without_touching_the_readme(tmp_path, monkeypatch, capsys):
    tables = _script("readme_tables")
    readme = Path(__file__).resolve().parents[1] / "README.md"
    before = readme.read_bytes()
    monkeypatch.setattr("sys.argv", ["readme_tables.py", "--check"])
    tables.main()  # the committed README matches the committed results
    assert "matches the tables" in capsys.readouterr().out
    stale = tmp_path / "README.md"
    stale.write_text(before.decode().replace("| keep |", "| kept |", 1))
    monkeypatch.setattr(tables, "README", stale)
    with pytest.raises(SystemExit) as exc:
        tables.main()
    assert "differs from the tables" in str(exc.value.code) and "+| keep |" in capsys.readouterr().out
    assert stale.read_text() == before.decode().replace("| keep |", "| kept |", 1)
    assert readme.read_bytes() == before


def test_readme_tables_write_rewrites_only_the_block_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    tables = _script("readme_tables")
    committed = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin = committed.index(tables.BEGIN) + len(tables.BEGIN)
    copy = tmp_path / "README.md"
    copy.write_text(committed[:begin] + "\nstale\n" + committed[committed.index(tables.END):])
    monkeypatch.setattr(tables, "README", copy)
    monkeypatch.setattr("sys.argv", ["readme_tables.py", "--write"])
    tables.main()
    assert copy.read_text() == committed and [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_speed_prints_a_rounded_summary_and_where_it_wrote(tmp_path, monkeypatch, capsys):
    speed = _script("speed")
    monkeypatch.setattr(speed, "run", lambda arch, n_refs_list, settings, *args, **kwargs: [
        {"arch": arch, "refs": n, "setting": s, "speedup": 1.23456789, "efficiency": 0.87654321}
        for n in n_refs_list for s in settings])
    monkeypatch.setattr(speed, "write_json", lambda *args, **kwargs: None)
    out = tmp_path / "s.json"
    monkeypatch.setattr("sys.argv", ["speed.py", "--quick", "--out", str(out)])
    speed.main()
    lines = capsys.readouterr().out.splitlines()
    assert "min_efficiency 0.877" in lines and lines[-1] == f"wrote {out}"  # was one dict of 16-digit floats

"""The benchmark scripts under benchmarks/ (imported as modules): their flags, outputs and summaries."""

from pathlib import Path

import pytest


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


def test_two_runs_writing_one_results_file_at_once_do_not_collide(tmp_path):
    import json

    common = _script("common")
    plt = common.pyplot()
    out = tmp_path / "speed.json"

    def plot():  # another run writes the same results while this one renders its plot
        common.write_json(out, {"summary": {"run": 2}})
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 2])
        return fig

    common.write_json(out, {"summary": {"run": 1}}, plot)  # shared temp names: the other run took this one's JSON
    assert json.loads(out.read_text())["summary"] == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json", "speed.png"]  # no temp file left


def test_a_folder_where_the_plot_goes_is_refused_before_working_and_never_costs_the_results(tmp_path):
    import argparse
    import json

    common = _script("common")
    out = tmp_path / "speed.json"
    out.with_suffix(".png").mkdir()
    ap = argparse.ArgumentParser()
    with pytest.raises(SystemExit):  # ap.error: a usage error before the benchmark runs
        common.check_json_out(out, ap)

    def plot():
        fig, ax = common.pyplot().subplots()
        ax.plot([0, 1], [1, 2])
        return fig

    with pytest.raises(RuntimeError, match="its plot failed"):  # the rename over the folder failed
        common.write_json(out, {"summary": {"x": 1}}, plot)
    assert json.loads(out.read_text())["summary"] == {"x": 1}  # was lost: the JSON's rename came after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json", "speed.png"]


def test_results_record_the_tokensparse_version_that_made_them(tmp_path):
    """Every benchmark JSON names the release of the code that wrote it (the README dates earlier runs by it),
    unless the payload records its own (merging.py per part)."""
    import json

    import tokensparse as ts

    common = _script("common")
    out = tmp_path / "speed.json"
    common.write_json(out, {"summary": {"x": 1}})
    written = json.loads(out.read_text())
    assert written["tokensparse"] == ts.__version__
    assert {"machine", "torch", "threads"} <= set(written)
    common.write_json(out, {"tokensparse": "0.1.0", "summary": {}})
    assert json.loads(out.read_text())["tokensparse"] == "0.1.0"


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


@pytest.mark.parametrize("script, argv, message", [
    ("selection", ["--selectors", "random,nope"], "--selectors takes a comma list of"),
    ("selection", ["--selectors", ""], "--selectors takes a comma list of"),
    ("selection", ["--families", "editing,typo"], "--families takes a comma list of"),
    ("selection", ["--keeps", "0.25,abc"], "--keeps takes a comma list of numbers"),
    ("selection", ["--masses", "1.5"], "--masses takes a comma list of numbers in (0, 1]"),
    ("guidance", ["--cfg-scales", "1.5,x"], "--cfg-scales takes a comma list of numbers"),
    ("guidance", ["--sg-gammas", "0.5"], "--sg-gammas takes a comma list of strong/weak pairs"),
    ("guidance", ["--sg-gammas", "0.9/0.5"], "0 <= strong <= weak < 1"),
])
def test_bad_lists_are_refused_before_loading(tmp_path, monkeypatch, capsys, script, argv, message):
    # selection's --selectors nope was a KeyError after the dense runs of every family
    mod = _script(script)
    monkeypatch.setattr(mod, "load", lambda spec: pytest.fail("loaded a model before checking the flags"))
    monkeypatch.setattr("sys.argv", [f"{script}.py", *argv, "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as exc:
        mod.main()
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


def test_quick_keeps_the_flags_typed_beside_it(monkeypatch):
    common = _script("common")
    ap = common.parser(None, "quality", "quick")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    monkeypatch.setattr("sys.argv", ["quality.py", "--quick", "--n", "64"])
    args = ap.parse_args()
    assert args.given == {"quick", "n"}
    assert common.quick_or(args, "n", 16) == 64  # typed (even at its default): kept; was 16, silently
    assert common.quick_or(args, "steps", 10) == 10  # not typed: the smoke run's value
    args = ap.parse_args(["--n", "5"])
    assert common.quick_or(args, "n", 16) == 5 and common.quick_or(args, "steps", 10) == 20
    assert [a.default for a in ap._actions if a.dest in ("n", "steps")] == [64, 20]  # defaults restored


@pytest.mark.parametrize("script, argv, seen", [
    ("quality", ["--n", "3", "--steps", "2"], (3, 16)),
    ("selection", ["--n", "3", "--keeps", "0.5"], (3, 8)),
])
def test_quick_benchmarks_run_the_sample_count_typed(tmp_path, monkeypatch, script, argv, seen):
    module = _script(script)
    counts = []

    def stop(n, size):
        counts.append(n)
        raise KeyboardInterrupt  # enough: the sample count is what the run would use

    monkeypatch.setattr(module, "load", lambda spec: pytest.importorskip("tokensparse").build_model("refdit-s"))
    monkeypatch.setattr(module, "heldout_by_family", stop)
    for extra in (argv, []):
        monkeypatch.setattr("sys.argv", [f"{script}.py", "--quick", *extra, "--out", str(tmp_path / "r.json")])
        with pytest.raises(KeyboardInterrupt):
            module.main()
    assert tuple(counts) == seen


def test_selection_quick_checks_a_typed_keep_list(tmp_path, monkeypatch, capsys):
    selection = _script("selection")
    monkeypatch.setattr(selection, "load", lambda spec: pytest.fail("loaded a model"))
    monkeypatch.setattr("sys.argv", ["selection.py", "--quick", "--keeps", "2", "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit):
        selection.main()  # was: --keeps ignored (unchecked) under --quick
    assert "--keeps takes a comma list of numbers in (0, 1]" in capsys.readouterr().err


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


def test_recipe_search_quotes_paths_and_closes_its_log(tmp_path, monkeypatch):
    import shlex

    search = _script("recipe_search")
    started = {}

    def popen(cmd, stdout=None, **kwargs):
        started.update(cmd=cmd, log=stdout)
        return "proc"

    monkeypatch.setattr(search.subprocess, "Popen", popen)
    root = tmp_path / "my runs"
    assert search.run_pipeline("v 1", {}, root, "cpu", 4, 1) == "proc"
    parts = [shlex.split(c) for c in started["cmd"].split(" && ")]
    assert [p[p.index("--config") + 1] for p in parts[:2]] == [str(root / "v 1" / "base_recipe.json"),
                                                               str(root / "v 1" / "sparse_recipe.json")]
    assert parts[2][parts[2].index("--out") + 1] == str(root / "v 1" / "quality.json")  # was split at the spaces
    assert started["log"].closed  # was left open in this process



def test_a_trainer_step_file_loads_as_its_recipes_model(tmp_path):
    # a refdit-s-kv step file has refdit-s's tensors: it was read as a joint-attention refdit-s, silently
    import torch

    import tokensparse as ts
    from tokensparse.run_checkpoints import save_tensors, state_tensors
    from tokensparse.train import TrainConfig, latest_checkpoint, run_ema, train

    common = _script("common")
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), model="refdit-s-kv", steps=1, batch_size=1, eval_every=10**9, tasks=["relight"]),
          log=lambda s: None, progress=False)
    step = latest_checkpoint(run)
    model = common.load(str(step / "ema.safetensors"))
    assert model.config == ts.build_model("refdit-s-kv").config and not model.training
    want = run_ema(run)[0].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    (step / "config.json").unlink()  # a checkpoint folder without its own recipe: the run folder's
    assert common.load(str(step / "ema.safetensors")).config.ref_attends_target is False
    (run / "config.json").unlink()  # no recipe at all: read as refdit-s, whose tensors these are
    assert common.load(str(step / "ema.safetensors")).config == ts.build_model("refdit-s").config
    (step / "model.safetensors").unlink()
    save_tensors(state_tensors(ts.build_model("refdit-s-text")), step / "model.safetensors")
    with pytest.raises(ValueError, match="not a refdit-s checkpoint"):  # a text encoder's tensors: not skipped
        common.load(str(step / "model.safetensors"))


def test_data_speed_records_the_release_and_readme_tables_names_it(tmp_path, monkeypatch, capsys):
    import json

    import tokensparse

    data_speed = _script("data_speed")
    written = {}
    monkeypatch.setattr(data_speed, "get_bank", lambda size: None)
    monkeypatch.setattr(data_speed, "stream_rate", lambda *args: [100.0, 200.0, 300.0])
    monkeypatch.setattr(data_speed, "make_sample", lambda *args: None)
    monkeypatch.setattr(data_speed, "write_json", lambda path, payload, plot=None: written.update(payload))
    monkeypatch.setattr("sys.argv", ["data_speed.py", "--quick", "--out", str(tmp_path / "d.json")])
    data_speed.main()
    assert written["tokensparse"] == tokensparse.__version__

    tables = _script("readme_tables")
    monkeypatch.setattr(tables, "R", tmp_path)
    run = {"stream_samples_per_s": {"32": {"median": 2780}}}
    (tmp_path / "data_speed.json").write_text(json.dumps(run))  # the committed run: no version recorded
    capsys.readouterr()
    tables.data()
    out = capsys.readouterr().out
    assert "run at tokensparse 0.1.0, the first task suite" in out and "32px 2,780 samples/s" in out
    (tmp_path / "data_speed.json").write_text(json.dumps({**run, "tokensparse": "9.9.9"}))
    tables.data()
    assert "one process, run at tokensparse 9.9.9): 32px 2,780 samples/s." in capsys.readouterr().out


def test_recipe_search_quick_keeps_a_typed_sample_count(tmp_path, monkeypatch):
    search = _script("recipe_search")
    variants = tmp_path / "variants.json"
    variants.write_text('{"v1": {}}')
    counts = []

    class Done:
        def wait(self) -> int:
            return 0

    monkeypatch.setattr(search, "run_pipeline", lambda name, spec, root, device, n, threads: counts.append(n) or Done())
    monkeypatch.setattr(search, "collect", lambda name, root: {})
    monkeypatch.setattr(search, "write_json", lambda *args, **kwargs: None)
    for extra in (["--n", "8"], []):
        monkeypatch.setattr("sys.argv", ["recipe_search.py", "--quick", *extra, "--variants", str(variants),
                                         "--device", "cpu", "--root", str(tmp_path / "runs"),
                                         "--out", str(tmp_path / "r.json")])
        search.main()
    assert counts == [8, 4]  # was [4, 4]: --quick replaced the typed --n, unlike every other benchmark


def test_merging_refdit_run_as_a_script_points_to_merging_py():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merging_refdit.py"
    res = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "benchmarks/merging.py" in res.stderr  # was: exit 0, nothing run, nothing said


@pytest.mark.parametrize("script, says, lines", [
    ("forward_cost", ["--model MODEL the named RefDiT config", "--repeats REPEATS timed repeats", "--out OUT JSON to"],
     "FLOPs.\n\n    python benchmarks/forward_cost.py"),
    ("flux_flops", ["--out OUT JSON to write", "--max-refs MAX_REFS FLUX.2 [klein] rows for 1 to"],
     "transformers\nwith Sparse Context"),
    ("selection", ["keep 0.25 only, masses 0.6 and 0.9"], ""),
    ("guidance", ["8 steps, --n-ref 8,"], ""),
])
def test_help_describes_every_flag_and_what_quick_changes(script, says, lines):
    import os
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    res = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-500:]
    flat = " ".join(res.stdout.split())
    for text in says:  # each flag's help beside it (was: none for these, or --quick's silent on what it sets)
        assert text in flat, (text, res.stdout)
    assert lines in res.stdout, res.stdout  # the description's lines and paragraphs kept (was: run together / cut)


@pytest.mark.parametrize("device, message", [("meta", "--device meta holds no data"),
                                             ("mps", "--device mps: not usable here"),
                                             ("cuda:7", "--device cuda:7: not usable here")])
def test_a_device_that_cannot_run_the_models_is_refused_before_loading(tmp_path, monkeypatch, capsys, device,
                                                                        message):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a one-GPU machine: cuda:7 is missing
    elif device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    quality = _script("quality")
    monkeypatch.setattr(quality, "load", lambda spec: pytest.fail("loaded a model before checking --device"))
    monkeypatch.setattr("sys.argv", ["quality.py", "--device", device, "--out", str(tmp_path / "q.json")])
    with pytest.raises(SystemExit) as exc:
        quality.main()  # meta: a ValueError traceback from generate; mps: a RuntimeError from model.to("mps")
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


def test_attention_kernel_records_the_step_attention_calls_speed_times():
    import torch

    import tokensparse as ts

    ak = _script("attention_kernel")
    pair = ak.models(ak.ARCH)
    refs = [torch.rand(3, 64, 64) for _ in range(4)]
    shapes = {s: ak.step_calls(pair, s, refs, ak.PROMPT) for s in ("dense", "sparse0.25", "sparse0.25+kv")}
    from tokensparse.vocab import tokenize

    depth, text = pair[False].config.depth, pair[False].prompt_embedder(tokenize(ak.PROMPT))[0].shape[1]
    # one call per block; joint: every token a query and a key; cached: the target's queries over target + context
    assert all(len(c) == depth for c in shapes.values())
    assert {(q[2], k[2]) for q, k, _ in shapes["dense"]} == {(256 + 4 * 256 + text,) * 2}
    assert {(q[2], k[2]) for q, k, _ in shapes["sparse0.25"]} == {(256 + 4 * 64 + text,) * 2}
    assert {(q[2], k[2]) for q, k, _ in shapes["sparse0.25+kv"]} == {(256, 256 + 4 * 64 + text)}
    assert ak.flops(shapes["dense"]) == 4 * depth * 6 * 1291 * 1291 * 32  # 6 heads of 32
    for m in pair.values():
        ts.remove_sparse_context(m)

"""Trainer: learns, resumes bit-exactly, keeps ranks in sync, random dropping is well-formed."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import tokensparse as ts
from tokensparse.models import build_model, save_checkpoint
from tokensparse.train import (
    DropConfig,
    TrainConfig,
    export_ema,
    init_model,
    latest_checkpoint,
    random_keep_mask,
    train,
)


def tiny_cfg(out, **kw):
    base = dict(out=str(out), model="refdit-tiny", steps=8, batch_size=4, ckpt_every=4, eval_every=10**9,
                warmup=2, log_every=2, tasks=["relight", "backdrop"])
    return TrainConfig(**{**base, **kw})


def test_short_run_lowers_the_loss(tmp_path):
    res = train(tiny_cfg(tmp_path, steps=60, lr=2e-3, log_every=10, ckpt_every=60), progress=False)
    losses = [v for _, v in res.state["losses"]]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]


def test_the_log_prints_held_out_evals_rounded_and_the_state_keeps_them_whole(tmp_path):
    """The log printed the eval as a raw dict of 16-digit floats (``{'step': 1, 'editing': 9.1234567890123, ...}``)."""
    lines = []
    res = train(tiny_cfg(tmp_path, steps=1, eval_every=1, eval_samples=1), log=lines.append, progress=False)
    entry = res.state["evals"][-1]
    families = [k for k in entry if k != "step"]
    assert entry["step"] == 1 and families
    line = next(line for line in lines if "PSNR" in line)
    assert line == "step 1: held-out PSNR " + ", ".join(f"{fam} {entry[fam]:.2f} dB" for fam in families)
    assert not re.search(r"\d\.\d{3}", line) and "{" not in line
    saved = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["evals"][-1]
    assert saved == entry  # the state file keeps full precision


def test_kill_and_resume_is_bit_exact(tmp_path):
    drop = DropConfig(p_full=0.3, keep_min=0.1)
    train(tiny_cfg(tmp_path / "a", drop=drop), progress=False)
    train(tiny_cfg(tmp_path / "b", drop=drop, stop_at=5), progress=False)  # "killed" after step 5
    assert json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())["step"] == 5
    train(tiny_cfg(tmp_path / "b", drop=drop), progress=False)  # resume
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(latest_checkpoint(tmp_path / "a") / name))
        b = load_file(str(latest_checkpoint(tmp_path / "b") / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_saved_and_export_loads(tmp_path):
    train(tiny_cfg(tmp_path / "run", steps=2), progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"] == "refdit-tiny" and saved["steps"] == 2
    from tokensparse.models import load_checkpoint

    path = export_ema(tmp_path / "run", tmp_path / "new" / "folder" / "w.safetensors")  # folders created
    model = load_checkpoint(path)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["step"] == 2 and info["recipe"]["model"] == "refdit-tiny"
    assert model.config.image_size == 16
    import tokensparse as ts

    again = ts.load_model(str(path))  # ts.load_model takes your own checkpoints by path too
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    umask = os.umask(0)
    os.umask(umask)
    ckpt = latest_checkpoint(tmp_path / "run")
    for f in (path, ckpt / "model.safetensors", ckpt / "ema.safetensors"):  # not owner-only (safetensors' temp files)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="beside it"):
        ts.load_model(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ts.load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="safetensors"):
        ts.load_model("refdit-nope")


def test_export_refuses_paths_that_would_overwrite_the_runs_own_files(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, steps=2), progress=False)
    recipe, ckpt = (run / "config.json").read_text(), latest_checkpoint(run)
    ema = (ckpt / "ema.safetensors").read_bytes()
    for path in (run / "config.safetensors", ckpt / "ema.safetensors", ckpt / "state.safetensors",
                 tmp_path / "link" / "config.safetensors"):
        if path.parent.name == "link":
            (tmp_path / "link").symlink_to(run)
        with pytest.raises(ValueError, match="config.json|checkpoint folder step_0000002"):
            export_ema(run, path)
    assert (run / "config.json").read_text() == recipe and (ckpt / "ema.safetensors").read_bytes() == ema
    assert export_ema(run, run / "w.safetensors").is_file()  # beside the checkpoints: fine


def test_export_refuses_to_replace_a_json_that_no_export_wrote(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    train(tiny_cfg(run, steps=2), progress=False)
    train(tiny_cfg(other, steps=2), progress=False)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": "refdit-tiny", "steps": 4}))
    notes = tmp_path / "notes.json"
    notes.write_text("not json")
    saved = {p: p.read_text() for p in (other / "config.json", recipe, notes)}
    for path in (other / "config.safetensors", recipe.with_suffix(".safetensors"), notes.with_suffix(".safetensors")):
        with pytest.raises(ValueError, match="not an exported checkpoint's metadata"):
            export_ema(run, path)
    assert {p: p.read_text() for p in saved} == saved
    assert not recipe.with_suffix(".safetensors").exists()
    out = export_ema(run, tmp_path / "w.safetensors")
    assert export_ema(run, out) == out  # an earlier export's metadata is replaced: exporting again is fine


def test_corrupt_or_misfitting_checkpoints_are_value_errors(tmp_path):
    import tokensparse as ts
    from tokensparse.models import build_model, save_checkpoint

    good, other = tmp_path / "good.safetensors", tmp_path / "other.safetensors"
    save_checkpoint(build_model("refdit-tiny"), good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:20])  # truncated
    bad.with_suffix(".json").write_text(good.with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.safetensors"):
        ts.load_model(bad)
    with pytest.raises(ValueError, match="cannot read .*bad.safetensors"):  # a recipe's init
        train(tiny_cfg(tmp_path / "run", init=str(bad)), progress=False)
    assert not (tmp_path / "run").exists()
    save_checkpoint(build_model("refdit-s"), other)
    other.with_suffix(".json").write_text(good.with_suffix(".json").read_text())  # weights of another size
    with pytest.raises(ValueError, match="does not fit"):
        ts.load_model(other)


def test_lora_run_trains_the_adapters_only_evaluates_and_exports_them_merged(tmp_path):
    from tokensparse.models import build_model, load_checkpoint, save_checkpoint
    from tokensparse.train import _with_lora, ema_model, init_model, load_into

    from .conftest import randomize

    base = tmp_path / "base.safetensors"  # LoRA adapts a trained model (a fresh one's zero adaLN gates block it)
    save_checkpoint(randomize(build_model("refdit-tiny")), base)
    cfg = tiny_cfg(tmp_path / "run", steps=4, lora_rank=2, lr=1e-2, ema=0.5, init=str(base), eval_every=4,
                   eval_samples=1)
    res = train(cfg, progress=False)
    assert [e["step"] for e in res.state["evals"]] == [4]  # held-out evals run for LoRA runs too
    torch.manual_seed(cfg.seed)
    start = init_model(cfg).state_dict()  # the base weights the run started from
    ckpt = latest_checkpoint(tmp_path / "run")
    trained = load_file(str(ckpt / "model.safetensors"))
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # the adapters (zero at start) learned
    for k, v in trained.items():  # everything else is frozen
        if "lora_" not in k:
            assert torch.equal(v, start[k.replace(".base_layer", "")]), k
    exported = load_checkpoint(export_ema(tmp_path / "run", tmp_path / "w.safetensors"))  # a plain RefDiT
    assert not any("lora" in k or "base_layer" in k for k in exported.state_dict())
    evaluated = ema_model(res.model, load_file(str(ckpt / "ema.safetensors")), cfg.lora_rank).state_dict()
    assert all(torch.equal(v, evaluated[k]) for k, v in exported.state_dict().items())  # the evals ran on it
    adapted = _with_lora(build_model("refdit-tiny"), 2)
    load_into(adapted, load_file(str(ckpt / "ema.safetensors")))
    x, t, p = torch.randn(2, 3, 16, 16), torch.full((2,), 0.6), torch.zeros(2, 1, dtype=torch.long)
    refs = [torch.rand(2, 3, 16, 16) * 2 - 1]
    with torch.no_grad():
        torch.testing.assert_close(exported(x, t, refs, p), adapted.eval()(x, t, refs, p), rtol=1e-4, atol=1e-5)
    again = init_model(tiny_cfg(tmp_path / "next", init=str(tmp_path / "run")))  # a LoRA run folder as init
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), exported.state_dict().values()))


def test_selected_dropping_keeps_what_the_selector_ranks_first(tmp_path):
    from tokensparse.api import reference_views

    img = torch.zeros(6, 3, 16, 16)
    img[:, :, 4:8, 8:12] = 1.0  # a white 4x4-pixel square (one 4x4 patch) on black, in every sample
    views = reference_views([img * 2 - 1], 4)
    drop = DropConfig(p_full=0.0, keep_min=1 / 16, keep_max=1 / 16, p_selected=1.0, selector="foreground")
    m = random_keep_mask(((4, 4),), 6, drop, torch.Generator().manual_seed(0), views)
    assert m.sum(1).tolist() == [1] * 6 and bool(m[:, 1 * 4 + 2].all())  # the square's token, every time
    plain = DropConfig(p_full=0.0, keep_min=1 / 16, keep_max=1 / 16)
    r = random_keep_mask(((4, 4),), 6, plain, torch.Generator().manual_seed(0))
    assert not bool(r[:, 6].all())  # random dropping does not
    with pytest.raises(ValueError, match="RefView"):
        random_keep_mask(((4, 4),), 6, drop, torch.Generator())
    with pytest.raises(ValueError, match="selector"):
        DropConfig(p_selected=0.5, selector="nope")
    res = train(tiny_cfg(tmp_path, steps=2, drop=DropConfig(p_selected=0.5)), progress=False)  # "auto", in the loop
    assert res.state["step"] == 2 and all(math.isfinite(v) for _, v in res.state["losses"])


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from accelerate import Accelerator, PartialState
    from tokensparse.train import TrainConfig, train
    mine, backward = [], Accelerator.backward  # this process's loss at each step, as it trains on it
    Accelerator.backward = lambda self, loss, **kw: (mine.append(float(loss)), backward(self, loss, **kw))[1]
    res = train(TrainConfig(out=sys.argv[1], model="refdit-tiny", steps=4, batch_size=2, ckpt_every=4, log_every=2,
                            eval_every=10**9, warmup=1, tasks=["relight"]), progress=False)
    rank = PartialState(cpu=True).process_index
    flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    torch.save(flat, f"{sys.argv[1]}/rank{rank}.pt")
    with open(f"{sys.argv[1]}/losses{rank}.json", "w") as f:
        json.dump({"mine": mine, "logged": res.state["losses"]}, f)
""")


def failed_run(proc: subprocess.CompletedProcess) -> str:
    """A failed torchrun's stderr, its start (where a rank's own error is) and its end (torchrun's summary)."""
    err = proc.stderr
    return err if len(err) <= 6000 else f"{err[:4000]}\n[...]\n{err[-2000:]}"


def test_two_process_cpu_run_keeps_ranks_identical_and_logs_their_mean_loss(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's `launch --cpu` starts one process; torchrun gives accelerate a 2-rank MULTI_CPU world
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failed_run(proc)
    r0 = torch.load(tmp_path / "out" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "out" / "rank1.pt", weights_only=True)
    assert torch.equal(r0, r1)
    init = torch.cat([p.detach().flatten() for p in __import__("tokensparse").build_model("refdit-tiny").parameters()])
    assert not torch.equal(r0, init)  # it did train
    runs = [json.loads((tmp_path / "out" / f"losses{r}.json").read_text()) for r in (0, 1)]
    assert runs[0]["logged"] == runs[1]["logged"]  # every process records the same logged loss
    mine = [run["mine"] for run in runs]
    assert len(mine[0]) == len(mine[1]) == 4 and mine[0] != mine[1]  # each process trains on its own batches
    logged = runs[0]["logged"]
    assert [s for s, _ in logged] == [2, 4]
    for s, v in logged:  # the mean over both processes of their losses since the last log
        assert v == pytest.approx((sum(mine[0][s - 2:s]) + sum(mine[1][s - 2:s])) / 4, rel=1e-9, abs=0)
    printed = re.findall(r"step (\d+)/4 loss (\S+)", proc.stdout)  # the main process's log lines
    assert printed == [(str(s), f"{v:.4f}") for s, v in logged]


def test_two_process_cli_stops_together_on_its_wall_budget_and_exports_once(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "refdit-tiny", "steps": 100000, "batch_size": 2, "ckpt_every": 50,
                                  "log_every": 10**6, "eval_every": 10**6, "warmup": 5, "max_minutes": 0.01,
                                  "out": str(tmp_path / "run")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tokensparse.cli", "train", "--config", str(recipe), "--export", str(tmp_path / "w.safetensors")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failed_run(proc)
    assert proc.stdout.count("stopped at step") == 1 and proc.stdout.count("wrote ") == 1  # the main process only
    step = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())["step"]
    assert proc.stdout.count(f"wall budget of 0.01 min reached at step {step}") == 2  # both ranks, one step
    assert json.loads((tmp_path / "w.json").read_text())["step"] == step


def test_init_loads_weights_into_the_recipes_architecture(tmp_path):
    # a joint-attention checkpoint (stored fp16) starts a K/V-cache model (ref_attends_target=False)
    from tokensparse.models import build_model, save_checkpoint
    from tokensparse.train import init_model

    torch.manual_seed(0)
    joint = build_model("refdit-s")
    save_checkpoint(joint, tmp_path / "joint.safetensors", dtype=torch.float16)
    kv = init_model(TrainConfig(out=str(tmp_path / "run"), model="refdit-s-kv",
                                init=str(tmp_path / "joint.safetensors")))
    assert kv.config.ref_attends_target is False
    for (name, a), b in zip(joint.state_dict().items(), kv.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), name
    with pytest.raises(FileNotFoundError):
        init_model(TrainConfig(out=str(tmp_path / "run"), init=str(tmp_path / "missing.safetensors")))
    # another architecture: the error says it is the init, and which model it had to fit
    with pytest.raises(ValueError, match=r"init .*joint.safetensors does not fit the recipe's model 'refdit-tiny'"):
        init_model(TrainConfig(out=str(tmp_path / "run"), model="refdit-tiny",
                               init=str(tmp_path / "joint.safetensors")))


def test_routed_training_runs_and_is_reproducible(tmp_path):
    cfg = dict(model="refdit-s-kv-routed", steps=2, batch_size=2, route=0.5, tasks=["scene", "backdrop"],
               drop=DropConfig())
    a = train(tiny_cfg(tmp_path / "a", **cfg), progress=False)
    b = train(tiny_cfg(tmp_path / "b", **cfg), progress=False)
    assert a.state["losses"] == b.state["losses"]
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(ValueError, match="route_span"):
        train(tiny_cfg(tmp_path / "c", route=0.5), progress=False)


def test_condition_dropout_trains_some_samples_unconditionally(tmp_path, monkeypatch):
    from tokensparse.models.refdit import RefDiT

    seen = []
    original = RefDiT.forward

    def spy(self, x, t, refs, prompt_ids, *a, **k):
        if self.training:
            seen.append(prompt_ids.clone())
        return original(self, x, t, refs, prompt_ids, *a, **k)

    monkeypatch.setattr(RefDiT, "forward", spy)
    train(tiny_cfg(tmp_path / "run", steps=6, batch_size=8, cond_drop=0.5), progress=False)
    rows = torch.cat(seen)
    null = (rows == 0).all(1)
    assert 0 < int(null.sum()) < len(rows)  # some, not all, prompts replaced by the null prompt
    seen.clear()
    train(tiny_cfg(tmp_path / "plain", steps=2, batch_size=8), progress=False)
    assert not (torch.cat(seen) == 0).all(1).any()


def test_train_config_takes_a_drop_dict_and_a_missing_init_makes_no_folder(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), model="refdit-tiny", drop={"p_full": 0.3},
                      init=str(tmp_path / "missing.safetensors"))
    assert isinstance(cfg.drop, DropConfig) and cfg.drop.p_full == 0.3
    with pytest.raises(FileNotFoundError):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_another_model_is_refused_before_it_is_touched(tmp_path):
    train(tiny_cfg(tmp_path / "run", steps=2, ckpt_every=2), progress=False)
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match="started with another recipe \\(model 'refdit-tiny' -> 'refdit-s'\\)"):
        train(tiny_cfg(tmp_path / "run", steps=4, model="refdit-s"), progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == saved  # the run can still be resumed / exported
    with pytest.raises(ValueError, match="at step 2, past steps=1: give steps=2 or more"):  # would silently not train
        train(tiny_cfg(tmp_path / "run", steps=1), progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == saved
    export_ema(tmp_path / "run", tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="tensors of another shape"):  # an init of another architecture
        train(tiny_cfg(tmp_path / "run2", model="refdit-s", init=str(tmp_path / "w.safetensors")), progress=False)
    assert not (tmp_path / "run2").exists()


def test_any_valid_recipe_seed_trains(tmp_path):
    res = train(tiny_cfg(tmp_path / "run", steps=1, seed=2**62 + 12345), progress=False)  # step seeds stay < 2**63
    assert res.state["step"] == 1


def test_damaged_run_folders_are_value_errors_naming_the_file(tmp_path):
    train(tiny_cfg(tmp_path / "run", steps=2, ckpt_every=2), progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    state = (ckpt / "state.json").read_text()
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))  # no elapsed_s
    with pytest.raises(ValueError, match="state.json lacks"):
        train(tiny_cfg(tmp_path / "run", steps=4), progress=False)
    (ckpt / "state.json").write_text("{oops")
    with pytest.raises(ValueError, match="cannot read state.json"):
        train(tiny_cfg(tmp_path / "run", steps=4), progress=False)
    (ckpt / "state.json").write_text(state)
    (ckpt / "optim.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read optim.pt"):
        train(tiny_cfg(tmp_path / "run", steps=4), progress=False)
    (tmp_path / "empty").mkdir()  # an init folder that holds no checkpoint
    with pytest.raises(ValueError, match="not a run folder"):
        train(tiny_cfg(tmp_path / "run2", init=str(tmp_path / "empty")), progress=False)
    assert not (tmp_path / "run2").exists()


def test_an_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import tokensparse.train as tr

    train(tiny_cfg(tmp_path / "run", steps=2, ckpt_every=2), progress=False)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.torch, "save", interrupted)  # Ctrl-C while optim.pt is written
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "run", steps=4, ckpt_every=2), progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"


def test_a_damaged_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    train(tiny_cfg(tmp_path / "run", steps=4, ckpt_every=2), progress=False)
    (tmp_path / "other" / "step_0000009").mkdir(parents=True)  # a complete-looking folder outside the run
    (tmp_path / "other" / "step_0000009" / "state.json").write_text('{"step": 9, "elapsed_s": 0}')
    (tmp_path / "state.json").write_text('{"step": 9, "elapsed_s": 0}')  # the run folder's parent looks complete
    for damaged in (b"\xff\xfe garbage", b"../other/step_0000009", str(tmp_path / "other" / "step_0000009").encode(),
                    b".."):
        (tmp_path / "run" / "latest").write_bytes(damaged)
        assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "step_0000004"


def test_resuming_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path):
    train(tiny_cfg(tmp_path / "run", steps=3, ckpt_every=2), progress=False)  # step 3 saved by the final save
    ckpt = latest_checkpoint(tmp_path / "run")
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert train(tiny_cfg(tmp_path / "run", steps=3, ckpt_every=2), progress=False).state["step"] == 3
    assert latest_checkpoint(tmp_path / "run") == ckpt and (ckpt / "model.safetensors").stat().st_mtime_ns == stamp


def test_each_step_is_saved_once_and_a_deleted_latest_falls_back_to_the_one_before(tmp_path, monkeypatch):
    import tokensparse.train as tr

    saves = []
    real = tr.save_run_checkpoint
    monkeypatch.setattr(tr, "save_run_checkpoint",
                        lambda out, step, *a, **k: saves.append(step) or real(out, step, *a, **k))
    train(tiny_cfg(tmp_path / "run", steps=3, ckpt_every=2), progress=False)
    assert saves == [2, 3]  # the loop's save at the last step is not repeated after it
    shutil.rmtree(tmp_path / "run" / "step_0000003")  # e.g. a damaged checkpoint, deleted as the error advises
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    assert train(tiny_cfg(tmp_path / "run", steps=3, ckpt_every=2), progress=False).state["step"] == 3
    assert saves == [2, 3, 3]  # resumed from step 2, trained step 3 again


def test_a_resave_killed_between_its_renames_keeps_the_moved_aside_checkpoint(tmp_path):
    train(tiny_cfg(tmp_path / "run", steps=2, ckpt_every=2), progress=False)
    run = tmp_path / "run"
    saved = {p.name: p.read_bytes() for p in (run / "step_0000002").iterdir()}
    (run / "step_0000002").rename(run / ".step_0000002.old")  # killed after the first rename of a re-save of step 2
    (run / ".step_0000002.tmp").mkdir()  # ... whose new copy was still being written
    (run / ".step_0000002.tmp" / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(run) == run / ".step_0000002.old"
    assert train(tiny_cfg(run, steps=2, ckpt_every=2), progress=False).state["step"] == 2  # resumed, not restarted
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".step", "step"))) == ["step_0000002"]
    assert {p.name: p.read_bytes() for p in (run / "step_0000002").iterdir()} == saved
    assert latest_checkpoint(run) == run / "step_0000002"


def test_two_saves_of_one_checkpoint_at_once_do_not_collide(tmp_path):
    from tokensparse.run_checkpoints import save_checkpoint_folder

    run, temps = tmp_path / "run", []

    def second(tmp):
        temps.append(tmp)
        (tmp / "state.json").write_text("2")

    def first(tmp):  # another save of step 1 runs while this one writes (shared temp names: it removed this one's)
        temps.append(tmp)
        save_checkpoint_folder(run, 1, second)
        (tmp / "state.json").write_text("1")

    assert save_checkpoint_folder(run, 1, first) == run / "step_0000001"
    assert len(set(temps)) == 2 and all(t.parent == run and t.name.startswith(".step_0000001.") for t in temps)
    assert (run / "step_0000001" / "state.json").read_text() == "1"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_0000001"]  # no temp folder or file left
    assert (run / "latest").read_text() == "step_0000001"
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "step_0000001").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only


def test_a_save_whose_rename_fails_leaves_no_temp_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from tokensparse.run_checkpoints import save_checkpoint_folder

    run = tmp_path / "run"
    save_checkpoint_folder(run, 1, lambda tmp: (tmp / "state.json").write_text("1"))
    rename = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp"):
            raise OSError(39, "Directory not empty")  # another save of the step put its copy in place first
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="Directory not empty"):
        save_checkpoint_folder(run, 1, lambda tmp: (tmp / "state.json").write_text("2"))
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # the finished copy was left behind


def test_a_resume_keeps_the_recipe_and_the_process_count_it_started_with(tmp_path):
    run = tmp_path / "run"
    init = tmp_path / "init.safetensors"
    save_checkpoint(build_model("refdit-tiny"), init)
    train(tiny_cfg(run, steps=2, ckpt_every=2, init=str(init)), progress=False)
    ckpt = latest_checkpoint(run)
    assert json.loads((ckpt / "config.json").read_text())["lr"] == tiny_cfg(run).lr  # beside each checkpoint
    assert json.loads((ckpt / "state.json").read_text())["num_processes"] == 1
    saved = (run / "config.json").read_text()
    for change, named in (({"lr": 1e-2}, "lr 0.0003 -> 0.01"), ({"drop": DropConfig()}, "drop None"),
                          ({"seed": 5}, "seed 0 -> 5"), ({"tasks": ["place"]}, "tasks")):
        with pytest.raises(ValueError, match=f"started with another recipe \\({named}"):
            train(tiny_cfg(run, steps=4, init=str(init), **change), progress=False)
    assert (run / "config.json").read_text() == saved  # refused before anything was written
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(ValueError, match="trained by 2 processes and this run has 1"):
        train(tiny_cfg(run, steps=4, init=str(init)), progress=False)
    (ckpt / "state.json").write_text(json.dumps(state))
    init.unlink()  # a resumed run takes its weights from the checkpoint: its init may be gone
    (run / ".step_0000007.tmp").mkdir()  # left by a save killed hard (a step this session never saves)
    res = train(tiny_cfg(run, steps=3, ckpt_every=1, log_every=1, init=str(init)), progress=False)
    assert res.state["step"] == 3  # steps and the intervals may change
    assert not list(run.glob(".step_*"))


def test_a_resume_that_spells_the_run_folder_otherwise_keeps_its_saved_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(tiny_cfg("runs/base", steps=2, ckpt_every=2), progress=False)
    monkeypatch.chdir(tmp_path / "runs" / "base")
    assert train(tiny_cfg(".", steps=3, ckpt_every=1), progress=False).state["step"] == 3  # resumed in place
    for path in ("config.json", "step_0000003/config.json"):  # '.' would train another folder from elsewhere
        saved = json.loads((tmp_path / "runs" / "base" / path).read_text())
        assert saved["out"] == "runs/base" and saved["steps"] == 3, path


def test_a_diverged_loss_stops_the_run_before_it_updates(tmp_path, monkeypatch):
    import tokensparse.train as tr

    run = tmp_path / "run"
    train(tiny_cfg(run, steps=2, ckpt_every=2), progress=False)
    before = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    monkeypatch.setattr(tr, "velocity", lambda x0, noise: torch.full_like(x0, float("nan")))
    with pytest.raises(ValueError, match="loss is not finite at step 3.*last checkpoint \\(step 2\\)"):
        train(tiny_cfg(run, steps=4, ckpt_every=1), progress=False)
    after = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert latest_checkpoint(run).name == "step_0000002" and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="at step 1 .*has no checkpoint yet"):
        train(tiny_cfg(tmp_path / "fresh", steps=4), progress=False)


def test_init_takes_a_shipped_name_and_fp16_on_a_cpu_is_refused(tmp_path):
    from tokensparse.models.zoo import CHECKPOINTS

    model = init_model(TrainConfig(out=str(tmp_path / "r"), model=CHECKPOINTS["refdit-base"], init="refdit-base"))
    shipped = ts.load_model("refdit-base").state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'fp16' needs a GPU"):
            train(tiny_cfg(tmp_path / "run", mixed_precision="fp16"), progress=False)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_folder(tmp_path, monkeypatch):
    import dataclasses

    import tokensparse.train as tr

    def broken(*args, **kwargs):
        raise RuntimeError("broken batch")

    monkeypatch.setattr(tr, "interpolate", broken)  # every step fails, the first one included
    with pytest.raises(RuntimeError, match="broken batch"):
        train(tiny_cfg(tmp_path / "new" / "run"), progress=False)
    assert not (tmp_path / "new").exists()  # the folders it made are gone: nothing is left to look like a run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="broken batch"):
        train(tiny_cfg(tmp_path / "mine"), progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # a folder it did not make stays
    (tmp_path / "empty").mkdir()
    for out in ("na/../nb", "nc/../empty"):  # '..' as the shell reads it: no 'na' / 'nc' made, 'empty' kept
        with pytest.raises(RuntimeError, match="broken batch"):
            train(tiny_cfg(tmp_path / out), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"] and not any((tmp_path / "empty").iterdir())
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")  # 'link/..' is 'real', as the kernel reads it
    with pytest.raises(RuntimeError, match="broken batch"):
        train(tiny_cfg(tmp_path / "link" / ".." / "run"), progress=False)
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["deep"] and not (tmp_path / "run").exists()
    monkeypatch.undo()
    stale = tmp_path / "stale"  # a run killed hard (SIGKILL) before its first checkpoint leaves its config.json
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps(dataclasses.asdict(tiny_cfg(stale, lr=1.0, seed=3))))
    assert train(tiny_cfg(stale, steps=2), progress=False).state["step"] == 2  # no checkpoint: starts fresh
    assert json.loads((stale / "config.json").read_text())["lr"] == tiny_cfg(stale).lr


def test_a_run_that_stops_before_its_first_step_leaves_no_run_folder(tmp_path):
    logged = []
    for i, stop in enumerate(({"stop_at": 0}, {"max_minutes": 1e-12})):  # 1e-12 min: spent before step 1
        res = train(tiny_cfg(tmp_path / "new" / str(i), **stop), log=logged.append, progress=False)
        assert res.state["step"] == 0 and not (tmp_path / "new").exists()  # no config.json without a checkpoint
    assert logged.count("stopped before its first step: nothing saved") == 2
    train(tiny_cfg(tmp_path / "run", steps=2, ckpt_every=2), progress=False)
    assert train(tiny_cfg(tmp_path / "run", steps=4, stop_at=0), progress=False).state["step"] == 2  # a resume
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002" and (tmp_path / "run" / "config.json").is_file()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # bf16 autocast on CPU
def test_train_twice_in_one_process_with_another_mixed_precision(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import tokensparse.run_processes as rp

    used, real = [], rp.accelerator

    def spy(mixed_precision):
        acc = real(mixed_precision)
        used.append(acc.mixed_precision)
        return acc

    monkeypatch.setattr(rp, "accelerator", spy)
    train(tiny_cfg(tmp_path / "a", steps=1), progress=False)
    assert train(tiny_cfg(tmp_path / "b", steps=1, mixed_precision="bf16"), progress=False).state["step"] == 1
    train(tiny_cfg(tmp_path / "c", steps=1), progress=False)
    assert used == ["no", "bf16", "no"]
    mine = Accelerator(cpu=True)  # an Accelerator the caller holds keeps its mixed precision through a run
    train(tiny_cfg(tmp_path / "e", steps=1, mixed_precision="bf16"), progress=False)
    assert used[-1] == "bf16" and mine.mixed_precision == "no" and AcceleratorState().mixed_precision == "no"
    AcceleratorState._reset_state()  # a process with no accelerate state yet: a later Accelerator() (train-lora's)
    train(tiny_cfg(tmp_path / "f", steps=1, mixed_precision="bf16"), progress=False)
    assert not AcceleratorState._shared_state  # left as found
    assert used[-1] == "bf16" and Accelerator(cpu=True).mixed_precision == "no"  # does not inherit the run's bf16
    monkeypatch.undo()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as in a distributed launch
    with pytest.raises(ValueError, match="mixed_precision 'bf16'.*'no'.*distributed"):
        train(tiny_cfg(tmp_path / "d", steps=1, mixed_precision="bf16"), progress=False)
    assert not (tmp_path / "d").exists()


def test_an_fp16_runs_loss_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    import tokensparse.run_processes as rp

    scalers, real = [], rp.accelerator

    def with_scaler(mixed_precision):  # fp16 needs a GPU: a CPU GradScaler stands in for accelerate's
        acc = real(mixed_precision)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)  # doubles every step
        scalers.append(acc.scaler)
        return acc

    monkeypatch.setattr(rp, "accelerator", with_scaler)
    train(tiny_cfg(tmp_path / "a", grad_clip=0.0), progress=False)
    train(tiny_cfg(tmp_path / "b", grad_clip=0.0, stop_at=5), progress=False)
    assert torch.load(latest_checkpoint(tmp_path / "b") / "scaler.pt")["scale"] == 16.0 * 2**5
    train(tiny_cfg(tmp_path / "b", grad_clip=0.0), progress=False)  # resume
    assert scalers[0].get_scale() == scalers[2].get_scale() == 16.0 * 2**8  # the scale went on, not restarted
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(latest_checkpoint(tmp_path / "a") / name))
        b = load_file(str(latest_checkpoint(tmp_path / "b") / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    (latest_checkpoint(tmp_path / "b") / "scaler.pt").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="cannot read scaler.pt"):
        train(tiny_cfg(tmp_path / "b", grad_clip=0.0, steps=9), progress=False)
    monkeypatch.undo()
    train(tiny_cfg(tmp_path / "c", steps=2), progress=False)  # no scaler (float32): no scaler.pt
    assert not (latest_checkpoint(tmp_path / "c") / "scaler.pt").exists()


def test_a_run_whose_accelerator_fails_still_puts_accelerates_state_back(monkeypatch):
    from accelerate.state import AcceleratorState

    from tokensparse import run_processes

    def failing(mixed_precision: str):
        AcceleratorState._shared_state.clear()  # as accelerator() resets it, then Accelerator(...) raises
        raise ValueError("bf16 is not supported here")

    monkeypatch.setattr(run_processes, "accelerator", failing)
    monkeypatch.setattr(AcceleratorState, "_shared_state", {"marker": "caller's"})
    with pytest.raises(ValueError, match="bf16"):
        with run_processes.run_accelerator("bf16"):
            pass
    assert AcceleratorState._shared_state == {"marker": "caller's"}  # was: left cleared


@pytest.mark.parametrize("damage", ["ema", "optim"])
def test_a_checkpoint_whose_ema_or_optimizer_state_does_not_fit_is_refused_at_resume(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    train(tiny_cfg(tmp_path / "run", steps=4, ckpt_every=2), progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    if damage == "ema":  # one tensor fewer: the first EMA update would raise a KeyError
        ema = load_file(ckpt / "ema.safetensors")
        ema.pop(sorted(ema)[0])
        save_file(ema, ckpt / "ema.safetensors")
    else:  # a moment of another shape: the first AdamW step would raise a size mismatch
        optim = torch.load(ckpt / "optim.pt", weights_only=True)
        first = optim["state"][0]
        first["exp_avg"] = torch.zeros(first["exp_avg"].numel() + 1)
        torch.save(optim, ckpt / "optim.pt")
    name = "ema.safetensors" if damage == "ema" else "optim.pt"
    with pytest.raises(ValueError, match=f"{name} does not fit"):  # was: a failure at step 5, mid-run
        train(tiny_cfg(tmp_path / "run", steps=6, ckpt_every=2), progress=False)


def test_a_fresh_run_does_not_replace_a_config_json_that_is_not_a_recipe(tmp_path):
    # `--out .` in a model's folder: its config.json was overwritten with the recipe, silently
    folder = tmp_path / "model"
    folder.mkdir()
    for text in ('{"hidden_size": 64}', "[1, 2]", "not json"):
        (folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match="not a training recipe"):
            train(tiny_cfg(folder, steps=1), progress=False)
        assert (folder / "config.json").read_text() == text and sorted(p.name for p in folder.iterdir()) == [
            "config.json"]
    (folder / "config.json").write_text(json.dumps({"model": "refdit-s", "steps": 9}))  # a run that saved nothing
    assert train(tiny_cfg(folder, steps=1), progress=False).state["step"] == 1


def test_training_without_accelerate_names_the_extra_and_leaves_no_run_folder(tmp_path, monkeypatch):
    from tokensparse.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed (no [train] extra)
    with pytest.raises(MissingExtraError, match=r"pip install 'tokensparse\[train\]'"):
        train(tiny_cfg(tmp_path / "run", steps=1), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_lora_run_without_peft_names_the_extra(monkeypatch):
    from tokensparse.extras import MissingExtraError
    from tokensparse.train import plain_model

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError, match=r"needs peft, which is not installed: pip install 'tokensparse\[train"):
        plain_model("refdit-tiny", {}, lora_rank=2)


def test_a_failed_write_of_config_json_keeps_the_run_recipe_whole(tmp_path, monkeypatch):
    # config.json was written in place: a write that failed half-way (disk full, Ctrl-C) left half a recipe, and
    # the run could no longer be resumed or exported
    from pathlib import Path

    run = tmp_path / "run"
    train(tiny_cfg(run, steps=2, ckpt_every=2), progress=False)
    saved = (run / "config.json").read_text()
    plain = Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        if "config.json" in self.name:
            plain(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return plain(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        train(tiny_cfg(run, steps=4, ckpt_every=2), progress=False)
    monkeypatch.undo()
    assert (run / "config.json").read_text() == saved
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert train(tiny_cfg(run, steps=4, ckpt_every=2), progress=False).state["step"] == 4  # still resumable


def test_only_the_main_process_says_the_run_was_resumed(tmp_path, monkeypatch):
    from accelerate import Accelerator

    run = tmp_path / "run"
    train(tiny_cfg(run, steps=2, ckpt_every=2), progress=False)
    said: list[str] = []
    train(tiny_cfg(run, steps=3, ckpt_every=2), log=said.append, progress=False)
    assert any(m.startswith("resumed from") for m in said)  # the main process says it
    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))  # as another rank sees it
    said.clear()
    res = train(tiny_cfg(run, steps=4, ckpt_every=2), log=said.append, progress=False)
    assert res.state["step"] == 4 and said == []  # every rank printed "resumed from ..."

"""The training recipe and the pure pieces of a step (tokensparse.train_config): no training here."""

import pytest
import torch

from tokensparse.train_config import DropConfig, TrainConfig, lr_at, random_keep_mask


def test_random_keep_mask_budgets():
    g = torch.Generator().manual_seed(0)
    m = random_keep_mask(((4, 4), (2, 2)), 64, DropConfig(p_full=0.5, keep_min=0.25, keep_max=0.5), g)
    per = [m[:, :16].sum(1), m[:, 16:].sum(1)]
    assert m.shape == (64, 20)
    assert bool(((per[0] >= 4) & ((per[0] <= 8) | (per[0] == 16))).all())
    assert bool((per[0] == 16).any()) and bool((per[1] >= 1).all())


def test_plain_dropping_draws_are_pinned():
    # p_selected=0 draws, per reference in order: keep fractions, full-or-not, a random rank per token
    from tokensparse.selection import topk_mask

    drop, grids = DropConfig(p_full=0.3, keep_min=0.1, keep_max=0.9), ((4, 4), (2, 3))
    m = random_keep_mask(grids, 7, drop, torch.Generator().manual_seed(5))
    g, want = torch.Generator().manual_seed(5), []
    for h, w in grids:
        frac = 0.1 + 0.8 * torch.rand(7, generator=g)
        frac = torch.where(torch.rand(7, generator=g) < 0.3, torch.ones(7), frac)
        want.append(topk_mask(torch.rand(7, h * w, generator=g), (frac * h * w).round().clamp(1, h * w).long()))
    assert torch.equal(m, torch.cat(want, 1))


def test_selected_dropping_equals_inference_selection():
    from tokensparse.api import reference_views
    from tokensparse.selection import select

    g = torch.Generator().manual_seed(3)
    refs = [torch.full((5, 3, 16, 16), -0.5) for _ in range(2)]
    for r, side in zip(refs, (4, 8)):  # a busy patch on a plain colour: "foreground" has a mass to share
        r[:, :, 4 : 4 + side, 4 : 4 + side] = torch.rand(5, 3, side, side, generator=g)
    views = reference_views(refs, 4, ["compose first top left second center center on red plain"] * 5)
    for selector in ("foreground", "uniform", "auto"):  # allocate="auto": SparseContextConfig's default
        drop = DropConfig(p_full=0.0, keep_min=0.25, keep_max=0.25, p_selected=1.0, selector=selector)
        for refs_used in (views[:1], views):  # one reference; two sharing their budget like select()
            grids = tuple(v.grid for v in refs_used)
            m = random_keep_mask(grids, 5, drop, torch.Generator().manual_seed(0), refs_used)
            want = select(refs_used, 0.25, selector, torch.Generator().manual_seed(0), allocate="auto")
            assert torch.equal(m, want), (selector, len(refs_used))


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


@pytest.mark.parametrize("kw", [{"cond_drop": 1.5}, {"cond_drop": -0.1}, {"route": 1.0}, {"route": -0.2}])
def test_bad_rates_are_value_errors(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


@pytest.mark.parametrize("field, err", [
    (dict(model="nope"), ValueError), (dict(tasks=["bogus"]), ValueError), (dict(tasks="recolor"), TypeError),
    (dict(family_weights={"bogus": 1}), ValueError), (dict(family_weights=[1, 2]), TypeError),
    (dict(family_weights={"open": 2.0}), ValueError),  # no open task selected: the weight would be dropped
    (dict(route=0.5), ValueError), (dict(seed=-1), ValueError), (dict(mixed_precision="fp64"), ValueError),
    (dict(out=None), TypeError), (dict(out=""), ValueError), (dict(out="  "), ValueError), (dict(drop="x"), TypeError),
    (dict(model=3), TypeError),
    (dict(lora_rank=2), ValueError),  # LoRA without init: nothing to adapt
])
def test_train_config_rejects_what_training_would_fail_on(field, err):
    with pytest.raises(err):
        TrainConfig(**field)


def test_every_committed_recipe_is_a_valid_config():
    import json
    from pathlib import Path

    from tokensparse.models import list_models

    root = Path(__file__).resolve().parents[1]
    recipes = sorted((root / "recipes").rglob("*.json"))
    assert len(recipes) >= 6
    for path in recipes:
        cfg = TrainConfig.from_dict(json.loads(path.read_text()))
        assert cfg.model in list_models(), path
        # repository-relative: shipped weights, or an earlier stage's output under runs/
        assert cfg.init is None or cfg.init.startswith("runs/") or (root / cfg.init).is_file(), path


def test_a_recipe_given_tuples_or_numpy_weights_resumes_as_it_was_saved(tmp_path):
    # config.json holds lists and floats: a tuple of tasks read back as a list refused the run's own resume
    # ("tasks ['relight'] -> ('relight',)"), and a numpy float32 weight could not be written at all
    import json
    from dataclasses import asdict

    import numpy as np

    from tokensparse.train import check_resume

    cfg = TrainConfig(out=str(tmp_path), model="refdit-tiny", tasks=("relight", "place"),
                      family_weights={"editing": np.float32(2.0), "subject": 1})
    assert cfg.tasks == ["relight", "place"] and cfg.family_weights == {"editing": 2.0, "subject": 1.0}
    saved = json.dumps(asdict(cfg))  # what train() writes as config.json
    assert json.loads(saved) == asdict(cfg)
    (tmp_path / "config.json").write_text(saved)
    assert check_resume(tmp_path, tmp_path / "step_0000001", {"step": 1}, cfg, 1)["tasks"] == ["relight", "place"]


@pytest.mark.parametrize("recipe, message", [
    ({"stepz": 3}, "unknown recipe field 'stepz' (did you mean 'steps'?); fields: out, model"),
    ({"drop": {"keep_mn": 0.1}}, "unknown drop field 'keep_mn' (did you mean 'keep_min'?)"),
    ({"a": 1, "b": 2}, "unknown recipe fields 'a', 'b'; fields:"),
])
def test_a_recipe_field_with_a_typo_is_named_as_such(recipe, message):
    with pytest.raises(TypeError) as info:  # was "TrainConfig.__init__() got an unexpected keyword argument"
        TrainConfig.from_dict(recipe)
    assert message in str(info.value)


@pytest.mark.parametrize("drop, error, message", [
    ({"p_full": "x"}, TypeError, "drop.p_full must be a number"),
    ({"keep_max": 1.5}, ValueError, "drop.keep_max"),
    ({"selector": "attention"}, ValueError, "drop.selector must be a scorer that needs no model probe"),
])
def test_a_bad_drop_value_in_a_recipe_is_named_with_its_section(drop, error, message):
    with pytest.raises(error) as info:  # was "p_full must be a number": which p_full, in a recipe?
        TrainConfig.from_dict({"drop": drop})
    assert str(info.value).startswith(message)

"""Training stream, held-out sets, floors and the task grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokensparse.data import (
    FAMILIES,
    HELDOUT_SEED_BASE,
    TASKS,
    Batch,
    batch_plan,
    batched,
    collate,
    floors,
    heldout,
    make_sample,
    mean_image,
    save_task_grid,
    train_batches,
)


def _same(a: Batch, b: Batch) -> bool:
    return (
        a.prompts == b.prompts
        and a.tasks == b.tasks
        and a.seeds == b.seeds
        and torch.equal(a.target, b.target)
        and len(a.refs) == len(b.refs)
        and all(torch.equal(x, y) for x, y in zip(a.refs, b.refs))
    )


def test_batches_shapes_and_uniform_ref_count():
    it = train_batches(8, image_size=16, seed=1)
    for _ in range(12):
        b = next(it)
        assert len(b) == 8 and b.target.shape == (8, 3, 16, 16)
        lo, hi = TASKS[b.tasks[0]].num_refs
        assert lo <= len(b.refs) <= hi and len(set(b.tasks)) == 1
        assert all(r.shape == (8, 3, 16, 16) and r.dtype == torch.float32 for r in b.refs)
        assert float(b.target.min()) >= 0 and float(b.target.max()) <= 1
    assert {batch_plan(k, 1, seed=1)[1] for k in range(200)} == {1, 2, 3, 4}


def test_batch_matches_make_sample():
    b = next(train_batches(4, seed=3))
    for i, (t, s) in enumerate(zip(b.tasks, b.seeds)):
        smp = make_sample(t, s, num_refs=len(b.refs))
        assert smp.prompt == b.prompts[i] and torch.equal(smp.target, b.target[i])
        assert all(torch.equal(smp.refs[j], b.refs[j][i]) for j in range(len(b.refs)))


def test_stream_is_resumable_and_deterministic():
    a = train_batches(4, seed=7)
    first = [next(a) for _ in range(6)]
    again = train_batches(4, seed=7)
    assert all(_same(x, next(again)) for x in first)
    resumed = train_batches(4, seed=7, start=4)
    assert _same(first[4], next(resumed)) and _same(first[5], next(resumed))
    strided = train_batches(4, seed=7, start=1, stride=2)  # rank 1 of 2
    assert _same(first[1], next(strided)) and _same(first[3], next(strided))
    other = next(train_batches(4, seed=8))
    assert not _same(first[0], other)


def test_task_and_family_filters_and_balance():
    b = next(train_batches(2, tasks=["place"]))
    assert b.tasks == ["place", "place"]
    fams = [TASKS[batch_plan(k, 1, 0, ["multi", "recolor"])[0]].family for k in range(200)]
    assert set(fams) == {"multi", "editing"}
    counts = {
        f: sum(x == f for x in (TASKS[batch_plan(k, 1)[0]].family for k in range(900))) for f in FAMILIES
    }
    assert all(250 <= c <= 350 for c in counts.values()), counts


def test_heldout_seeds_never_in_train_stream():
    train_seeds = set()
    for k in range(300):
        train_seeds.update(batch_plan(k, 32, seed=0)[2])
    assert max(train_seeds) < HELDOUT_SEED_BASE
    for fam in FAMILIES:
        ho = heldout(fam, n=512)
        seeds = {s.seed for s in ho}
        assert min(seeds) >= HELDOUT_SEED_BASE and not seeds & train_seeds
        assert len(ho) == 512
        per_task = {t: sum(s.task == t for s in ho) for t in TASKS if TASKS[t].family == fam}
        assert max(per_task.values()) - min(per_task.values()) <= 1  # balanced


def test_heldout_is_fixed_and_consistent_per_task():
    a, b = heldout("subject", n=8, image_size=16), heldout("subject", n=8, image_size=16)
    assert all(torch.equal(x.target, y.target) and x.prompt == y.prompt for x, y in zip(a, b))
    place = heldout("place", n=4, image_size=16)
    assert all(torch.equal(place[j].target, a[2 * j].target) for j in range(4))


def test_batched_groups_by_ref_count():
    ho = heldout("multi", n=24, image_size=16)
    seen = []
    for idx, batch in batched(ho, 5):
        assert len(batch) == len(idx) <= 5
        for j, i in enumerate(idx):
            assert len(ho[i].refs) == len(batch.refs)
            assert torch.equal(batch.target[j], ho[i].target)
        seen += idx
    assert sorted(seen) == list(range(24))


def test_floors():
    ho = heldout("editing", n=6, image_size=16)
    fl = floors(ho)
    assert set(fl) == {"copy_ref", "mean_image"}
    for v in fl.values():
        assert v.shape == (6, 3, 16, 16)
    assert all(torch.equal(fl["copy_ref"][i], s.refs[0]) for i, s in enumerate(ho))
    assert torch.equal(fl["mean_image"][0], fl["mean_image"][3])  # same task -> same mean image
    assert not torch.equal(fl["mean_image"][0], fl["mean_image"][1])


def test_mixed_image_sizes_are_a_value_error():
    small, big = make_sample("place", 0, 16), make_sample("place", 0, 32)
    for fn in (collate, floors):  # both were a RuntimeError from torch.stack
        with pytest.raises(ValueError, match=r"one image size, got \(3, 16, 16\) \(sample 0\) and \(3, 32, 32\)"):
            fn([small, big])
    with pytest.raises(ValueError, match="one image size"):
        list(batched([small, big], 2))
    assert collate([small, make_sample("place", 1, 16)]).target.shape == (2, 3, 16, 16)


def test_mean_image_is_a_fresh_tensor():
    """Editing a returned mean image in place does not reach the cache behind it (later calls, floors)."""
    first = mean_image("relight", 16)
    want = first.clone()
    first.zero_()
    assert torch.equal(mean_image("relight", 16), want)
    assert torch.equal(floors(heldout("relight", n=1, image_size=16))["mean_image"][0], want)


def test_task_grid(tmp_path):
    path = tmp_path / "grid.png"
    save_task_grid(path, image_size=16, per_task=1)
    img = Image.open(path)
    assert img.size[0] > 300 and img.size[1] >= len(TASKS) * 16


def test_family_weights_shift_the_mix_and_validate():
    from collections import Counter

    fams = Counter(TASKS[batch_plan(k, 2, 0, None, {"subject": 3.0})[0]].family for k in range(3000))
    assert fams["subject"] > 1.8 * fams["editing"] and fams["subject"] > 1.8 * fams["multi"]
    only = {TASKS[batch_plan(k, 2, 0, None, {"editing": 0, "multi": 0})[0]].family for k in range(200)}
    assert only == {"subject"}
    assert batch_plan(5, 4, 0) == batch_plan(5, 4, 0, None, None)  # default stream unchanged
    with pytest.raises(ValueError, match="unknown families"):
        batch_plan(0, 2, 0, None, {"sujet": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        batch_plan(0, 2, 0, None, {"subject": -1.0})


def test_bad_stream_arguments_are_named_before_the_first_batch():
    import numpy as np

    from tokensparse.data import get_bank, heldout_plan, make_batch

    for kwargs, err, name in (({"seed": 1.5}, TypeError, "seed"), ({"stride": 1.5}, TypeError, "stride"),
                              ({"start": -1}, ValueError, "start"), ({"tasks": "editing"}, TypeError, "tasks"),
                              ({"family_weights": {"editing": "2"}}, TypeError, "family_weights"),
                              ({"family_weights": {"editing": float("inf")}}, ValueError, "family_weights"),
                              ({"image_size": 30}, ValueError, "image_size")):
        with pytest.raises(err, match=name):
            train_batches(2, **kwargs)  # raised by the call itself, not at the first next()
    with pytest.raises(TypeError, match="batch_size"):
        train_batches(2.5)
    huge = next(train_batches(4, 16, family_weights={"editing": 1e308, "subject": 1e308}))  # the sum overflows
    assert len(huge.prompts) == 4
    with pytest.raises(ValueError, match="unknown task 'bogus'"):
        make_batch("bogus", [0])
    with pytest.raises(TypeError, match="seeds"):
        make_batch("place", "12")
    with pytest.raises(ValueError, match="batch_size"):
        batched(heldout("subject", 2), 0)
    with pytest.raises(ValueError, match="n must be"):
        heldout_plan("multi", -1)
    assert get_bank(np.int64(32)) is get_bank(32)  # numpy ints, as everywhere else


@pytest.mark.parametrize("size", [-8, 0, 10**7, 32.0])
def test_mean_image_checks_the_size_first(size):
    with pytest.raises(ValueError, match="image_size must be a multiple of 8"):  # was numpy's "negative
        mean_image("recolor", size)  # dimensions", a 2 PiB MemoryError, or a float TypeError


@pytest.mark.parametrize("scale, err", [(-1, ValueError), (0, ValueError), (2.5, TypeError)])
def test_task_grid_checks_scale(tmp_path, scale, err):
    with pytest.raises(err, match="scale"):  # -1 claimed the grid was too tall ("at most -683 per task")
        save_task_grid(tmp_path / "grid.png", image_size=16, per_task=1, scale=scale)
    assert not (tmp_path / "grid.png").exists()


def test_batch_plan_checks_its_numbers():
    for bad in ({"seed": 1.5}, {"k": 1.9}, {"batch_size": 2.0}):  # floats were truncated: seed 1.5 gave seed 1's plan
        with pytest.raises(TypeError, match=f"{next(iter(bad))} must be an int"):
            batch_plan(**{"k": 0, "batch_size": 2, **bad})
    for bad in ({"seed": -3}, {"k": -1}, {"batch_size": -1}):  # numpy's "expected non-negative integer" / ...
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            batch_plan(**{"k": 0, "batch_size": 2, **bad})
    assert batch_plan(np.int64(3), np.int64(2), np.int64(1)) == batch_plan(3, 2, 1)


def test_family_weights_for_a_family_with_no_selected_task_are_refused():
    # the open family is trained only when named: {"open": 2} with the default tasks drew no scene batch at all
    for tasks, weights in ((None, {"open": 2.0}), (["relight", "recolor"], {"editing": 1.0, "subject": 5.0})):
        with pytest.raises(ValueError, match="none of the selected tasks"):
            train_batches(2, 16, tasks=tasks, family_weights=weights)
        with pytest.raises(ValueError, match="none of the selected tasks"):
            batch_plan(0, 2, 0, tasks, weights)
    # a zero weight for such a family asks for what happens anyway: fine
    assert batch_plan(3, 2, 0, None, {"open": 0.0, "subject": 2.0})[0] in TASKS

"""Task suite: determinism, shapes, prompts, and the exactness properties of each task."""

import numpy as np
import pytest
import torch

from tokensparse.data import ALL_FAMILIES, FAMILIES, HELDOUT_SEED_BASE, REFERENCE_TASKS, TASKS, make_sample
from tokensparse.data.bank import COLORS, get_bank
from tokensparse.data.tasks import RELIGHT_GAINS
from tokensparse.vocab import MAX_PROMPT_LEN, tokenize


def _bytes(s):
    return b"".join(r.numpy().tobytes() for r in s.refs) + s.target.numpy().tobytes() + s.prompt.encode()


def test_families_and_specs():
    assert FAMILIES == ("editing", "subject", "multi")
    for fam in FAMILIES:
        assert sum(spec.family == fam for spec in TASKS.values()) >= 2
    for name, spec in TASKS.items():
        assert spec.name == name and spec.family in ALL_FAMILIES
        lo, hi = spec.num_refs
        assert (1 if name in REFERENCE_TASKS else 0) <= lo <= hi <= 4
    assert set(REFERENCE_TASKS) == {t for t, spec in TASKS.items() if spec.family in FAMILIES}
    assert all(TASKS[t].num_refs[1] >= 2 for t in TASKS if TASKS[t].family == "multi")


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_identical_bytes(task):
    a, b = make_sample(task, 123), make_sample(task, 123)
    assert _bytes(a) == _bytes(b)
    c = make_sample(task, 124)
    assert _bytes(a) != _bytes(c)
    h1, h2 = make_sample(task, HELDOUT_SEED_BASE + 5), make_sample(task, HELDOUT_SEED_BASE + 5)
    assert _bytes(h1) == _bytes(h2)


@pytest.mark.parametrize("size", [16, 24, 32, 48, 64])
def test_shapes_and_ranges(size):
    for task, spec in TASKS.items():
        for seed in range(6):
            s = make_sample(task, seed, size)
            lo, hi = spec.num_refs
            assert lo <= len(s.refs) <= hi
            for img in [*s.refs, s.target]:
                assert img.shape == (3, size, size) and img.dtype == torch.float32
                assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
                assert torch.isfinite(img).all()
            assert s.task == task and s.family == spec.family and s.seed == seed


@pytest.mark.slow
def test_size_128():
    for task in TASKS:
        assert make_sample(task, 0, 128).target.shape == (3, 128, 128)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("nope", 0)
    with pytest.raises(ValueError, match="image_size"):
        make_sample("place", 0, 30)
    with pytest.raises(ValueError, match="references"):
        make_sample("place", 0, num_refs=2)
    with pytest.raises(ValueError, match="seed"):
        make_sample("place", -1)


def test_every_prompt_tokenizes():
    for task in TASKS:
        for seed in [*range(150), *range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + 50)]:
            s = make_sample(task, seed)
            ids = tokenize(s.prompt)
            assert ids.shape == (1, MAX_PROMPT_LEN)
            assert (ids > 0).sum() == len(s.prompt.split())


def test_num_refs_fixed_and_varied():
    for task in ("compose", "compose_scene"):
        counts = {len(make_sample(task, s).refs) for s in range(40)}
        assert counts == {2, 3, 4}
        for r in (2, 3, 4):
            s = make_sample(task, 7, num_refs=r)
            assert len(s.refs) == r
            assert len(s.prompt.split()) <= MAX_PROMPT_LEN
    # fixing num_refs to the task's only value does not change the sample
    assert _bytes(make_sample("place", 9)) == _bytes(make_sample("place", 9, num_refs=1))


def test_heldout_subjects_disjoint_from_train():
    bank = get_bank(32)
    assert len(np.intersect1d(bank.train_subjects, bank.heldout_subjects)) == 0
    assert len(bank.heldout_subjects) >= 100


def test_relight_is_exact_gain():
    for seed in range(10):
        s = make_sample("relight", seed)
        gain = torch.tensor(RELIGHT_GAINS[s.prompt.split()[1]])[:, None, None]
        assert torch.allclose(s.target, (s.refs[0] * gain).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("task", ["recolor", "remove"])
def test_editing_is_local_and_aligned(task):
    for seed in range(20):
        s = make_sample(task, seed)
        changed = (s.target - s.refs[0]).abs().amax(0) > 1e-6
        assert 0 < changed.float().mean() <= 0.15  # one object (<= 3S/8 side) changes, the rest is copied


def test_remove_recovers_photo_under_translucent_object():
    """remove: where the named object was, target = (ref - a*c) / (1 - a) with the object's colour c."""
    from tokensparse.data.tasks import OBJECT_ALPHA

    for seed in range(10):
        s = make_sample("remove", seed)
        c = torch.tensor(COLORS[s.prompt.split()[2]])[:, None, None]
        inside = ((s.target - s.refs[0]).abs().amax(0) > 1e-6) & (
            (s.refs[0] - (s.target * (1 - OBJECT_ALPHA) + OBJECT_ALPHA * c)).abs().amax(0) < 1e-5
        )
        changed = (s.target - s.refs[0]).abs().amax(0) > 1e-6
        assert inside.sum() >= 0.4 * changed.sum()  # fully covered (non-edge) pixels follow it exactly


def test_subject_targets_use_named_background():
    bank = get_bank(32)
    for seed in range(20):
        s = make_sample("place", seed)
        w = s.prompt.split()  # place subject ROW COL SIZE on COLOUR PATTERN
        bg = torch.from_numpy(bank.backgrounds[(w[6], w[7])])
        same = (s.target - bg).abs().amax(0) < 1e-6
        assert same.float().mean() >= 0.70  # only the subject (<= S/2 side) differs
        s = make_sample("backdrop", seed)
        w = s.prompt.split()
        bg = torch.from_numpy(bank.backgrounds[(w[1], w[2])])
        assert ((s.target - bg).abs().amax(0) < 1e-6).float().mean() >= 0.70


def test_backdrop_keeps_subject_pixels():
    """backdrop: where the reference is not its plain colour, the subject pixels are identical in the target
    (wherever the subject is opaque)."""
    for seed in range(10):
        s = make_sample("backdrop", seed)
        ref = s.refs[0]
        plain = (ref - ref[:, :1, :1]).abs().amax(0) < 1e-6
        moved = (~plain).float().mean()
        assert 0.03 < moved < 0.30
        same = ((s.target - ref).abs().amax(0) < 1e-6) & ~plain
        assert same.sum() >= 0.5 * (~plain).sum()


def test_compose_scene_copies_first_reference():
    for seed in range(10):
        s = make_sample("compose_scene", seed)
        same = ((s.target - s.refs[0]).abs().amax(0) < 1e-6).float().mean()
        assert 0.4 < same < 1.0


def test_references_are_redundant_for_subject_families():
    """Subject references are mostly plain background: at 32 px with 4x4 patches, a 25 % token budget can hold
    the whole subject of every subject reference (sides S/4 or 3S/8 at any position)."""
    for task in ("place", "backdrop", "compose", "compose_scene"):
        for seed in range(20):
            for ref in make_sample(task, seed).refs[1 if task == "compose_scene" else 0 :]:
                tok = ref.unfold(1, 4, 4).unfold(2, 4, 4)  # (3, 8, 8, 4, 4) 4x4 patches
                plain = (tok - ref[:, :1, :1, None, None]).abs().amax((0, 3, 4)) < 1e-6
                assert (~plain).float().mean() <= 0.25 + 1e-6


def test_scene_has_many_right_answers_for_one_prompt():
    # same prompt, different targets: the shape's kind, size and place are free
    by_prompt: dict[str, list[torch.Tensor]] = {}
    for seed in range(400):
        s = make_sample("scene", seed)
        assert s.refs == [] and s.prompt.startswith("scene ") and tokenize(s.prompt).shape[1] == MAX_PROMPT_LEN
        by_prompt.setdefault(s.prompt, []).append(s.target)
    repeated = [v for v in by_prompt.values() if len(v) >= 2]
    assert repeated and any(not torch.equal(v[0], v[1]) for v in repeated)
    words = make_sample("scene", 7).prompt.split()
    obj, bg = words[1], words[4]
    assert obj != bg  # the object never disappears into its background colour


def test_data_functions_reject_bad_arguments():
    import numpy as np
    import pytest

    from tokensparse.data import floors, heldout, make_batch, make_sample

    assert make_sample("place", 0, np.int64(32)).target.shape == (3, 32, 32)
    with pytest.raises(TypeError, match="num_refs"):
        make_sample("compose", 0, 32, num_refs=2.7)
    with pytest.raises(ValueError, match="n must be"):
        heldout("subject", n=-3)
    with pytest.raises(ValueError, match="at least one seed"):
        make_batch("place", [])
    with pytest.raises(ValueError, match="references"):
        floors(heldout("scene", 1))

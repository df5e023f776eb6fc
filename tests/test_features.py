"""FeatureNet (FID features): shapes, word targets, training lowers the loss, save/load round trip."""

import pytest
import torch

from tokensparse.features import (
    FeatureNet,
    load_feature_net,
    save_feature_net,
    train_feature_net,
    word_targets,
)
from tokensparse.vocab import tokenize


def test_features_shape_any_size():
    net = FeatureNet().eval()
    for size in (16, 32, 48):
        assert net(torch.rand(3, 3, size, size)).shape == (3, net.num_features)
    with pytest.raises(ValueError, match="expects"):
        net(torch.rand(3, 32, 32))


def test_word_targets_are_the_prompt_words():
    t = word_targets(["scene red object on blue dots", ""])
    ids = set(tokenize("scene red object on blue dots")[0].tolist()) - {0}
    assert set(t[0].nonzero().flatten().tolist()) == ids and t[1].sum() == 0


def test_short_training_and_round_trip(tmp_path):
    net, meta = train_feature_net(steps=3, batch_size=8, log=lambda s: None)
    assert set(meta["heldout_word_recall_at_k"]) == {"editing", "subject", "multi", "open"}
    assert all(0 <= v <= 1 for v in meta["heldout_word_recall_at_k"].values())
    path = tmp_path / "f.safetensors"
    save_feature_net(net, path, meta)
    loaded = load_feature_net(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), net(x), atol=1e-2)  # stored in float16
    with pytest.raises(FileNotFoundError):
        load_feature_net(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kwargs, error, match", [({"steps": 0}, ValueError, "steps must be >= 1"),
                                                  ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
                                                  ({"steps": 2.5}, TypeError, "steps must be an int"),
                                                  ({"lr": 0.0}, ValueError, "lr must be > 0")])
def test_train_feature_net_names_a_bad_argument(kwargs, error, match):
    with pytest.raises(error, match=match):  # steps=0: the LR schedule's "Expected positive integer total_steps"
        train_feature_net(**{"steps": 1, "batch_size": 2, **kwargs}, log=lambda s: None)


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "--steps must be >= 1, got 0"),
                                           (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
                                           (["--out", "{tmp}/f.txt"], "--out must be a .safetensors path"),
                                           (["--out", "{tmp}/dir.safetensors"], "is a folder"),
                                           (["--out", "{tmp}/file/f.safetensors"], "is a file, not a folder")])
def test_features_command_refuses_bad_flags_before_training(tmp_path, monkeypatch, capsys, args, message):
    import tokensparse.features as features

    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(features, "train_feature_net", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(SystemExit) as exc:
        features.main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "file"]


def test_features_command_reports_a_failed_write_in_one_line(tmp_path, monkeypatch, capsys):
    import tokensparse.features as features

    monkeypatch.setattr(features, "train_feature_net", lambda steps, batch_size: (FeatureNet(), {}))

    def full_disk(net, path, meta):
        raise OSError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(features, "save_feature_net", full_disk)
    out = tmp_path / "f.safetensors"
    with pytest.raises(SystemExit) as exc:
        features.main(["--steps", "1", "--out", str(out)])  # was an OSError traceback after training
    assert exc.value.code == 1 and f"cannot write {out}: No space left" in capsys.readouterr().err

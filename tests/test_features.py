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

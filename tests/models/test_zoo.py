"""Named models and checkpoints (``tokensparse.models.zoo``)."""

import pytest

import tokensparse as ts


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_called_empty_not_the_current_folder(name):
    # "" is the working folder to Path: it read " is a folder, not a .safetensors checkpoint"
    with pytest.raises(ValueError, match=r"name is empty; give one of \['refdit-base'") as info:
        ts.load_model(name)
    assert "is a folder" not in str(info.value)

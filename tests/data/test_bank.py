import numpy as np
import pytest
import torch

from tokensparse.data.bank import check_size


def test_check_size_takes_the_numbers_the_checks_take():
    # a 0-d tensor was "image_size must be a multiple of 8 ..., got tensor(32)" where tokensparse.checks took it
    for size in (32, np.int64(32), torch.tensor(32), np.array(32)):
        assert check_size(size) == 32 and type(check_size(size)) is int
    for bad in (30, 32.0, torch.tensor(32.0), torch.tensor([32]), np.array([32]), True, "32", 264):
        with pytest.raises(ValueError, match="image_size must be a multiple of 8 in \\[16, 256\\]"):
            check_size(bad)

import pytest
import torch

import tokensparse as ts

torch.set_num_threads(1)  # tiny models: threads only add overhead (and thrash on a shared 2-core machine)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised (adaLN-zero) layers random weights so an untrained model is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture
def tiny() -> ts.RefDiT:
    torch.manual_seed(0)
    return randomize(ts.build_model("refdit-tiny"))


@pytest.fixture
def tiny_kv() -> ts.RefDiT:
    torch.manual_seed(0)
    return randomize(ts.build_model("refdit-tiny", ref_attends_target=False))


def make_refs(n: int, size: int = 16, batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, size, size, generator=g) for _ in range(n)]

import pytest
import torch
from PIL import Image

from tokensparse.models import save_checkpoint
from tokensparse.show_selection import save_selection_map


def _png(path, img):
    Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


@pytest.fixture
def refs(tmp_path):
    subject = torch.full((3, 32, 32), 0.4)
    subject[:, 8:16, 8:16] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    photo = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    return [_png(tmp_path / "a.png", subject), _png(tmp_path / "b.png", photo)]


def test_selection_map_foreground(refs, tmp_path):
    out = tmp_path / "map.png"
    masks = save_selection_map(refs[:1], "foreground", 0.25, out)
    assert out.is_file() and Image.open(out).size == (256, 256)
    assert int(masks[0].sum()) == 16 and masks[0][2:4, 2:4].all()  # the subject's 4 tokens are kept


def test_selection_map_two_refs_share_the_budget(refs, tmp_path):
    out = tmp_path / "map2.png"
    masks = save_selection_map(refs, "auto", 0.25, out, prompt="compose first top left on second")
    assert Image.open(out).size == (256 * 2 + 8, 256)
    assert int(masks[0].sum() + masks[1].sum()) == 32 and int(masks[0].sum()) < int(masks[1].sum())


def test_selection_map_attention_needs_a_model(refs, tmp_path, tiny):
    with pytest.raises(ValueError, match="model"):
        save_selection_map(refs, "attention", 0.25, tmp_path / "x.png")
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny, ckpt)
    masks = save_selection_map(refs, "attention", 0.5, tmp_path / "att.png", model=str(ckpt),
                               prompt="place subject top left")
    assert [m.shape for m in masks] == [(4, 4), (4, 4)] and int(sum(m.sum() for m in masks)) == 16


def test_selection_masks_leave_the_models_sparse_context_applied(tiny):
    import tokensparse as ts
    from tokensparse.api import sparse_context_config
    from tokensparse.show_selection import selection_masks

    images = [torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = ts.SparseContextConfig(keep=0.25, selector="attention")
    want = selection_masks(images, cfg, 4, "place the subject", tiny)  # dense model
    ts.apply_sparse_context(tiny, cfg)
    assert all(torch.equal(a, b) for a, b in zip(selection_masks(images, cfg, 4, "place the subject", tiny), want))
    assert sparse_context_config(tiny) == cfg  # still applied (it was removed before)
    ts.remove_sparse_context(tiny)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 30}, "not a multiple of patch_size"),
    ({"patch_size": 0}, "patch_size must be >= 1"),
    ({"image_size": 0}, "image_size must be >= 1"),
    ({"scale": 0}, "scale must be >= 8"),
    ({"scale": 3}, "scale must be >= 8"),
])
def test_selection_map_refuses_a_bad_grid_or_scale_in_one_line(refs, tmp_path, kwargs, message):
    out = tmp_path / "map.png"
    with pytest.raises(ValueError, match=message):
        save_selection_map(refs[:1], "foreground", 0.25, out, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("as_type", [str, lambda p: p])
def test_selection_map_names_a_single_path_given_for_the_list(refs, tmp_path, as_type):
    with pytest.raises(TypeError, match="list of image paths.*pass \\[path\\]"):
        save_selection_map(as_type(refs[0]), "foreground", 0.25, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

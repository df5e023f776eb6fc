"""tokensparse.kvcache: a layer's cached context K/V joined behind the target's without copying them every step."""

import torch

from tokensparse.kvcache import ContextKV, KVJoin
from tokensparse.vocab import tokenize

from .conftest import make_refs


def kv(n: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(seed))


def test_a_join_is_the_concatenation_bit_for_bit_and_reuses_its_buffers_without_autograd():
    k, v = kv(5, 0), kv(5, 1)
    join = KVJoin(k, v)
    with torch.no_grad():
        first = join.join(kv(4, 2), kv(4, 3))
        ptr = first[0].data_ptr()
        for seed in range(3):  # every later call writes only the target's rows into the same buffers
            kx, vx = kv(4, 10 + seed), kv(4, 20 + seed).transpose(1, 2).contiguous().transpose(1, 2)  # any strides
            jk, jv = join.join(kx, vx)
            assert jk.data_ptr() == ptr
            assert torch.equal(jk, torch.cat([kx, k], 2)) and torch.equal(jv, torch.cat([vx, v], 2))
            assert jk.is_contiguous() and jv.is_contiguous()  # the layout cat gives: the same attention kernel
        kx = kv(3, 30)  # another target length (token merging): new buffers, the same values
        assert torch.equal(join.join(kx, kx)[0], torch.cat([kx, k], 2))
    assert torch.equal(k, kv(5, 0)) and torch.equal(v, kv(5, 1))  # the cache itself is never written


def test_a_join_under_autograd_is_a_fresh_differentiable_concatenation():
    join = KVJoin(kv(5, 0), kv(5, 1))
    kx = kv(4, 2).requires_grad_()
    a, b = join.join(kx, kx), join.join(kx, kx)
    assert a[0] is not b[0]  # nothing shared between calls whose graphs may still be needed
    (a[0].sum() + b[1].sum()).backward()
    assert torch.equal(kx.grad, torch.full_like(kx, 2.0))


def test_buffers_made_in_inference_mode_are_not_written_outside_it():
    join = KVJoin(kv(5, 0), kv(5, 1))
    with torch.inference_mode():
        join.join(kv(4, 2), kv(4, 3))
    with torch.no_grad():  # writing into an inference tensor here would raise
        kx = kv(4, 4)
        assert torch.equal(join.join(kx, kx)[0], torch.cat([kx, kv(5, 0)], 2))


def test_the_cache_keeps_one_join_per_layer_and_remakes_those_of_replaced_layers():
    cache = ContextKV([(kv(5, 0), kv(5, 1)), (kv(5, 2), kv(5, 3))], None, torch.zeros(2, 4))
    joins = cache.joins()
    assert cache.joins() is joins and all(j.k is k and j.v is v for j, (k, v) in zip(joins, cache.layers))
    cache.layers[1] = (kv(5, 4), kv(5, 5))
    assert cache.joins()[1].k is cache.layers[1][0] and cache.joins()[0] is joins[0]


def test_repeated_cached_steps_equal_recomputing_the_context(tiny_kv):
    refs, p = [r * 2 - 1 for r in make_refs(3, batch=2)], tokenize(["place the subject top left", "relight"])
    cache = tiny_kv.context_kv(refs, p)
    with torch.no_grad():
        for i, t in enumerate((1.0, 0.6, 0.2)):  # the joins' buffers carry over from step to step
            x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i))
            assert torch.equal(tiny_kv(x, t, None, p, context_kv=cache), tiny_kv(x, t, refs, p))
    del cache.layers[0]
    assert len(cache.joins()) == 1 and cache.joins()[0].k is cache.layers[0][0]

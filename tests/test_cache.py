"""Paged KV cache: allocation, append, O(1) truncation, per-page key bounds."""
import pytest
import torch

from specattn.cache import PagedKVCache
from specattn.errors import CacheFullError, InvalidInputError


def write_random(cache, q_len, layer=0):
    cache.reserve(q_len)
    view = cache.step_view(q_len)
    b = cache.batch
    k = torch.randn(b, q_len, cache.cfg.num_kv_heads, cache.cfg.head_dim)
    v = torch.randn_like(k)
    for layer in range(cache.cfg.num_layers):
        cache.write(layer, k, v, view)
    cache.advance(q_len)
    return k, v


def test_append_then_gather_returns_what_was_written(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 2, 100, page_size=4)
    cache.reset(2)
    k1, v1 = write_random(cache, 7)
    k2, v2 = write_random(cache, 1)
    k3, v3 = write_random(cache, 5)
    assert cache.host_lens() == [13, 13]
    assert cache.lens.tolist() == [13, 13]
    for b in range(2):
        k, v = cache.gather(1, b)
        want_k = torch.cat([k1[b], k2[b], k3[b]]).transpose(0, 1)
        want_v = torch.cat([v1[b], v2[b], v3[b]]).transpose(0, 1)
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_sequences_never_share_pages(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 3, 64, page_size=4)
    cache.reset(3)
    write_random(cache, 10)
    pages = [set(cache.page_table[b, :3].tolist()) for b in range(3)]
    assert not (pages[0] & pages[1]) and not (pages[1] & pages[2]) and not (pages[0] & pages[2])


def test_truncate_is_a_rollback_that_frees_whole_pages(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 2, 64, page_size=4)
    cache.reset(2)
    k1, _ = write_random(cache, 9)
    write_random(cache, 6)                     # 15 tokens = 4 pages each
    free_before = len(cache._free_pages)
    cache.truncate([9, 12])                    # 3 pages each: one page back from each sequence
    assert cache.host_lens() == [9, 12] and cache.lens.tolist() == [9, 12]
    assert len(cache._free_pages) == free_before + 2
    k4, _ = write_random(cache, 3)                       # re-append overwrites the rolled-back slots
    k, _ = cache.gather(0, 0)
    assert torch.equal(k[:, :9], k1[0].transpose(0, 1)) and torch.equal(k[:, 9:], k4[0].transpose(0, 1))
    with pytest.raises(InvalidInputError):
        cache.truncate([13, 100])


def test_key_bounds_are_exact_min_max_of_valid_rows(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 2, 64, page_size=4, track_key_bounds=True)
    cache.reset(2)
    write_random(cache, 6)
    write_random(cache, 3)
    cache.truncate([7, 9])
    write_random(cache, 2)    # page 1 of seq 0 holds rows 4..8 now, with row 7 rewritten
    for b in range(2):
        k, _ = cache.gather(0, b)                           # [heads, len, dim]
        n = cache.host_lens()[b]
        for p in range(-(-n // 4)):
            page = cache.page_table[b, p].item()
            rows = k[:, p * 4:min(n, p * 4 + 4)]
            assert torch.equal(cache.key_min[0, page], rows.amin(1))
            assert torch.equal(cache.key_max[0, page], rows.amax(1))


def test_cache_full_is_a_clear_error(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 2, 16, page_size=4, num_pages=5)
    cache.reset(2)
    with pytest.raises(CacheFullError, match="per sequence"):
        cache.reserve(17)
    cache.reserve(8)                     # 2 pages each, 1 of 5 left
    cache.advance(8)
    with pytest.raises(CacheFullError, match="ran out"):
        cache.reserve(4)                 # needs 2 more pages
    assert len(cache._free_pages) == 1 and [len(p) for p in cache._pages[:2]] == [2, 2]   # nothing taken


def test_bytes_read_accounting(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 1, 16)
    cache.count_read(10)
    assert cache.kv_bytes_read == 10 * tiny_cfg.num_layers * 2 * tiny_cfg.num_kv_heads * tiny_cfg.head_dim * 4


def test_an_idle_sequence_attends_to_its_new_block_only(tiny_cfg):
    cache = PagedKVCache(tiny_cfg, 2, 64, page_size=8)
    cache.reset(2)
    cache.reserve(20)
    cache.advance(20)
    cache.reserve(3)
    cache.mark_idle([False, True])
    view = cache.step_view(3)
    assert view.lens_after.tolist() == [23, 23] and view.attend_lens.tolist() == [23, 3]
    cache.reset(2)                                                   # a new generation starts with none idle
    assert not cache.idle.any()

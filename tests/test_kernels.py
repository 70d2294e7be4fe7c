"""Triton paged attention vs the PyTorch reference on fresh random inputs (TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch

from specattn.kernels import paged_attention, reference

# (batch, q_len, kv_heads, group, head_dim, lens): GQA ratios 1/4/8, odd lengths, ragged batches,
# decode (1), verify (5, 16) and prefill-shaped blocks (40, 67) that the kernel tiles.
CASES = [
    (1, 1, 2, 1, 16, [1]),
    (3, 1, 1, 4, 32, [37, 5, 64]),
    (2, 5, 2, 8, 16, [100, 23]),
    (2, 16, 1, 4, 16, [16, 51]),
    (1, 40, 2, 1, 16, [77]),
    (2, 67, 1, 8, 16, [67, 90]),
]


def make_inputs(batch, q_len, kv_heads, group, dim, lens, dtype, page_size=16):
    max_pages = -(-max(lens) // page_size) + 1
    num_pages = batch * max_pages + 3
    k = torch.randn(num_pages, page_size, kv_heads, dim, dtype=dtype)
    v = torch.randn_like(k)
    table = torch.stack([torch.randperm(num_pages)[:max_pages] for _ in range(batch)]).int()
    q = torch.randn(batch, q_len, kv_heads * group, dim, dtype=dtype)
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-q{c[1]}-kv{c[2]}-g{c[3]}" for c in CASES])
@pytest.mark.parametrize("num_splits", [None, 1, 3])      # 1: the split kernel writes the output, no merge
def test_fp32_matches_reference(case, num_splits):
    torch.manual_seed(CASES.index(case))
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    scale = case[4] ** -0.5
    ref = reference.paged_attention(q, k, v, table, lens, scale)
    out = paged_attention.paged_attention(q, k, v, table, lens, scale, num_splits=num_splits)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("case", CASES[1:4], ids=["decode", "verify-g8", "verify-16"])
def test_bf16_error_close_to_the_references_own(case):
    """Kernel error within the project's bf16 tolerance (1e-2 relative) and a small multiple of the error of
    the reference run in bf16. Not 2x as in flash-attention's tests: the kernel rounds probabilities to bf16
    before P @ V (as flash-attention does), the CPU reference keeps its softmax in fp32."""
    torch.manual_seed(1)
    q, k, v, table, lens = make_inputs(*case, torch.bfloat16)
    scale = case[4] ** -0.5
    exact = reference.paged_attention(q.double(), k.double(), v.double(), table, lens, scale)
    ref_lowp = reference.paged_attention(q, k, v, table, lens, scale).double()
    out = paged_attention.paged_attention(q, k, v, table, lens, scale).double()
    assert (out - exact).norm() <= 1e-2 * exact.norm()
    assert (out - exact).norm() <= 4 * (ref_lowp - exact).norm()


def test_every_output_element_is_written():
    torch.manual_seed(2)
    q, k, v, table, lens = make_inputs(2, 3, 2, 4, 16, [9, 40], torch.float32)
    out = paged_attention.paged_attention(q, k, v, table, lens, 0.25, num_splits=4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("m,n,k", [(1, 96, 320), (3, 70, 256), (4, 64, 200), (2, 33, 1000), (5, 40, 150),
                                   (70, 48, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_linear(m, n, k, dtype):
    """The decode GEMV (FMA sums up to MAX_ROWS rows, tensor-core tiles above, more than one block of rows at 70;
    row-major and column-major weights, K not a multiple of the tile) against F.linear, and accumulating in place
    (add=out) against out + F.linear."""
    from specattn.kernels import gemv
    torch.manual_seed(m * 100 + n)
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    tiling = gemv.GemvTiling(block_n=16, block_k=128 if m <= gemv.MAX_ROWS else 32, num_warps=4)
    want = torch.nn.functional.linear(x.float(), w.float())
    for weight in (w, w.t().contiguous().t()):
        got = gemv.gemv(x, weight, tiling=tiling)
        assert got.dtype == dtype and got.shape == (m, n)
        assert ((got.float() - want).norm() / want.norm()).item() < tol
    base = torch.randn(m, n, dtype=dtype)
    out = base.clone()
    gemv.gemv(x, w, out=out, add=out, tiling=tiling)          # in place, as into the residual stream
    full = base.float() + want
    assert ((out.float() - full).norm() / full.norm()).item() < tol


def test_programmatic_dependent_launch_stays_off_where_it_cannot_run(monkeypatch):
    """PDL needs a Hopper GPU and compiled code: never on CPU tensors or in Triton's interpreter (no griddepcontrol
    there), whatever the mode; mode 0 launches plainly everywhere."""
    from specattn.kernels import pdl
    cpu = torch.device("cpu")
    for mode in pdl.MODES:
        monkeypatch.setattr(pdl, "MODE", mode)
        assert pdl.launch_options(cpu) == {"PDL": 0} and not pdl.active(cpu)
    monkeypatch.setattr(pdl, "MODE", 2)
    monkeypatch.setattr(pdl, "INTERPRETED", True)
    monkeypatch.setattr(pdl, "_hopper_or_later", lambda index: True)
    assert not pdl.active(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "INTERPRETED", False)
    assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": 2, "launch_pdl": True}
    monkeypatch.setattr(pdl, "MODE", 0)
    assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": 0}


def test_num_splits_fill_the_gpu_but_never_exceed_blocks():
    assert paged_attention.choose_num_splits(1, 8, 32768, 132) == 32    # 33 would hold 16 tiles each, the last none
    assert paged_attention.choose_num_splits(1, 8, 32768 + 16, 132) == 33           # 513 tiles: 16 in the last
    few = paged_attention.FEW_PROGRAMS
    assert paged_attention.choose_num_splits(1, 8, 8192, 132, few) == 32             # 64 tiles of 128 keys, 2 each
    assert paged_attention.choose_num_splits(1, 8, 8192 + 128, 132, few) == 33       # 65 tiles: 2 each but one
    assert paged_attention.choose_num_splits(1, 8, 1000, 132, few) == 8                # 8 tiles: one each
    assert paged_attention.choose_num_splits(64, 8, 32768, 132) == 1
    assert paged_attention.choose_num_splits(1, 3, 100, 132) == 2      # 100 tokens = 2 blocks of 64


@pytest.mark.parametrize("mass_tokens", [None, 16, 64], ids=["no-mass", "page-mass", "block64-mass"])
def test_splits_planned_for_the_sequences_still_reading(mass_tokens, monkeypatch):
    """A fixed batch's tail: most sequences idle, their lengths covering only the new block (as cache.attend_lens
    makes them), two still long. Planned for those two (plan_rows) the launch takes more splits, most of them empty;
    output and page mass still equal the reference's, and the merge reads only partials a split wrote (scratch is
    filled with NaN)."""
    empty = torch.empty

    def nan_scratch(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.manual_seed(61)
    lens = [3] * 24
    lens[5], lens[17] = 900, 611
    q, k, v, table, lens_t = make_inputs(24, 3, 2, 2, 16, lens, torch.float32)
    plans = []
    plan = paged_attention._plan_launch
    monkeypatch.setattr(paged_attention, "_plan_launch", lambda *a: plans.append(plan(*a)) or plans[-1])
    monkeypatch.setattr(torch, "empty", nan_scratch)
    page_mass = mass_tokens is not None
    ref = reference.paged_attention(q, k, v, table, lens_t, 0.25, page_mass=page_mass)
    out = paged_attention.paged_attention(q, k, v, table, lens_t, 0.25, page_mass=page_mass, plan_rows=2,
                                          mass_tokens=mass_tokens if mass_tokens != 16 else None)
    whole = paged_attention.paged_attention(q, k, v, table, lens_t, 0.25, page_mass=page_mass,
                                            mass_tokens=mass_tokens if mass_tokens != 16 else None)
    if page_mass:
        (out, mass), (ref, ref_mass), (whole, _) = out, ref, whole
        assert torch.isfinite(mass).all()
        if mass_tokens == 64:     # block mass spreads a 64-key block's mass over its pages: compare per block
            mass, ref_mass = (m[..., : m.shape[-1] // 4 * 4].unflatten(-1, (-1, 4)).sum(-1) for m in (mass, ref_mass))
        assert (mass - ref_mass).abs().max().item() < 1e-4
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert torch.allclose(out, whole, atol=1e-5)
    assert plans[0][1] > plans[1][1] > 1           # more splits planned for 2 sequences than for 24


def random_selection(batch, kv_heads, lens, page_size=16, keep=0.5, seed=0):
    """Per (sequence, KV head) sorted lists of logical pages, always with the last page; -1 padded."""
    g = torch.Generator().manual_seed(seed)
    max_pages = -(-max(lens) // page_size)
    sel = torch.full((batch, kv_heads, max_pages), -1, dtype=torch.int32)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b in range(batch):
        n = -(-lens[b] // page_size)
        for h in range(kv_heads):
            pages = [p for p in range(n - 1) if torch.rand(1, generator=g).item() < keep] + [n - 1]
            sel[b, h, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
            counts[b, h] = len(pages)
    return sel, counts


MASS_CASES = [(1, 1, 2, 1, 16, [200]), (3, 1, 1, 4, 32, [37, 5, 64]), (2, 5, 2, 8, 16, [100, 23]),
              (2, 16, 1, 4, 16, [16, 51])]


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("case", MASS_CASES, ids=[f"b{c[0]}-q{c[1]}-g{c[3]}" for c in MASS_CASES])
@pytest.mark.parametrize("num_splits", [None, 1, 2])
@pytest.mark.parametrize("launch", [paged_attention.FEW_PROGRAMS, paged_attention.DEFAULT_LAUNCH],
                         ids=["mass-stored-per-tile", "mass-deferred"])
@pytest.mark.parametrize("by_warp", [False, True], ids=["one-hot", "warp-sums"])
def test_page_mass_by_product_matches_reference(case, num_splits, launch, by_warp, monkeypatch):
    """Exact page mass by the page one-hot product or by sums inside warps over keys in _warp_order, stored every
    tile or held in registers (deferred); these small heads would take the block path otherwise
    (exact_mass_by_blocks; tested below)."""
    monkeypatch.setattr(paged_attention, "BLOCK_PATH_MAX_HEAD_DIM", 0)
    monkeypatch.setattr(paged_attention, "PAGE_SUMS_BY_WARP", by_warp)
    spy = LaunchSpy(paged_attention._paged_attn_split_kernel)
    monkeypatch.setattr(paged_attention, "_paged_attn_split_kernel", spy)
    assert paged_attention.defer_page_mass(launch) == (launch is paged_attention.DEFAULT_LAUNCH)
    torch.manual_seed(MASS_CASES.index(case) + 10)
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    scale = case[4] ** -0.5
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, num_splits=num_splits,
                                                launch=launch)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4
    # Every row's probabilities sum to one: the mass of a KV head sums to (query heads per KV head) x rows.
    group, q_len = case[3], case[1]
    assert torch.allclose(mass.sum(-1), torch.full_like(mass.sum(-1), group * q_len), atol=1e-4)
    assert spy.launches[-1]["WARP_PAGES"] == (launch.num_warps if by_warp else 0)


@pytest.mark.parametrize("launch", [paged_attention.FEW_PROGRAMS, paged_attention.DEFAULT_LAUNCH],
                         ids=["stored-per-tile", "deferred"])
def test_page_sums_in_fp16_for_bf16_attention(launch, monkeypatch):
    """bf16 attention keeps its page sums by warp in fp16 (PAGE_SUMS_HALF), the row maxima in fp32: the mass stays
    within 1e-3 of the largest against the fp32 reference, and the launch took that path."""
    monkeypatch.setattr(paged_attention, "BLOCK_PATH_MAX_HEAD_DIM", 0)
    spy = LaunchSpy(paged_attention._paged_attn_split_kernel)
    monkeypatch.setattr(paged_attention, "_paged_attn_split_kernel", spy)
    torch.manual_seed(46)
    q, k, v, table, lens = make_inputs(2, 5, 2, 4, 64, [1500, 777], torch.bfloat16)
    _, ref_mass = reference.paged_attention(q.float(), k.float(), v.float(), table, lens, 0.125, page_mass=True)
    _, mass = paged_attention.paged_attention(q, k, v, table, lens, 0.125, page_mass=True, launch=launch)
    assert spy.launches[-1]["SUMS_HALF"] and spy.launches[-1]["WARP_PAGES"] == launch.num_warps
    assert ((mass - ref_mass).abs().max() / ref_mass.abs().max()).item() < 1e-3


def test_warp_order_gives_each_warp_whole_pages():
    """Column c of a tile holds key _warp_order(c); warp w holds the columns 8w + 8·warps·r + i of the product
    (mma v2 layout). Each warp's keys must be a contiguous run of whole pages, and the order a permutation."""
    import triton
    import triton.language as tl

    @triton.jit
    def order_kernel(out_ptr, BLOCK_N: tl.constexpr, WARPS: tl.constexpr):
        cols = tl.arange(0, BLOCK_N)
        tl.store(out_ptr + cols, paged_attention._warp_order(cols, BLOCK_N, WARPS))

    for block_n, warps, page in [(128, 4, 16), (64, 4, 16), (128, 4, 32), (256, 8, 16)]:
        cols = torch.arange(block_n)
        keys = torch.empty(block_n, dtype=torch.int32)
        order_kernel[(1,)](keys, BLOCK_N=block_n, WARPS=warps)
        assert sorted(keys.tolist()) == list(range(block_n))
        warp_of_col = (cols // 8) % warps
        for w in range(warps):
            mine = keys[warp_of_col == w]
            assert mine.max() - mine.min() + 1 == len(mine) == block_n // warps
            assert len(mine) % page == 0 and mine.min() % page == 0


@pytest.mark.parametrize("by_block", [True, False], ids=["finished-per-block", "finished-per-page"])
@pytest.mark.parametrize("subtiles", [False, True], ids=["tile-per-block", "two-blocks-per-128-key-tile"])
@pytest.mark.parametrize("case", MASS_CASES[1:3], ids=["b3-q1-g4", "b2-q5-g8"])
def test_block_page_mass_matches_reference(case, subtiles, by_block, monkeypatch):
    """Mass per 64-key block (the tile's own row sums), spread over its pages: kernel == reference, and the
    mass of each 4-page block equals the sum of the exact per-page masses. Both tilings (these small batches
    launch 128-key tiles, so with sub-tiles each tile sums two blocks), and the finishing launch either per block
    (MASS_FINISH_BY_BLOCK) or per page."""
    monkeypatch.setattr(paged_attention, "BLOCK_MASS_SUBTILES", subtiles)
    monkeypatch.setattr(paged_attention, "MASS_FINISH_BY_BLOCK", by_block)
    torch.manual_seed(40 + case[1])
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    scale = case[4] ** -0.5
    _, exact = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True)
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4
    pages = exact.shape[-1] // 4 * 4
    blocks = exact[..., :pages].view(*exact.shape[:2], -1, 4).sum(-1)
    assert torch.allclose(mass[..., :pages].view(*exact.shape[:2], -1, 4).sum(-1), blocks, atol=1e-4)


@pytest.mark.parametrize("page_size", [64, 128])
@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one-split"])
def test_exact_page_mass_of_large_pages_takes_the_block_path(page_size, num_splits, monkeypatch):
    """Pages of >= BLOCK_PATH_MIN_PAGE tokens: exact page mass (no mass_tokens) is summed the way block mass is,
    with no page one-hot, and equals the reference's exact mass per page, dense and through StepMass."""
    planned = []
    plan = paged_attention._plan_launch
    monkeypatch.setattr(paged_attention, "_plan_launch", lambda *a, **kw: planned.append(plan(*a, **kw)) or planned[-1])
    torch.manual_seed(49 + page_size)
    q, k, v, table, lens = make_inputs(2, 5, 2, 4, 16, [700, 130], torch.float32, page_size=page_size)
    scale = 0.25
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, num_splits=num_splits)
    assert planned[-1][2], "exact mass of large pages should take the block path"
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4
    assert torch.allclose(mass.sum(-1), torch.full_like(mass.sum(-1), 4 * 5), atol=1e-4)
    step = paged_attention.StepMass(1)
    paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, num_splits=num_splits,
                                    step_mass=step, layer=0)
    finished = step.finish(torch.zeros(1, *mass.shape), lens)
    assert torch.allclose(finished[0], mass, atol=1e-6)


@pytest.mark.parametrize("mass_tokens", [None, 16, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_splits", [None, 1])
@pytest.mark.parametrize("launch", [None, paged_attention.DEFAULT_LAUNCH, paged_attention.FEW_PROGRAMS],
                         ids=["auto", "64-key-tiles", "128-key-tiles"])
def test_mass_of_16_token_pages_takes_the_block_path_for_small_heads_or_larger_blocks(mass_tokens, head_dim,
                                                                                         num_splits, launch,
                                                                                         monkeypatch):
    """Pages of 16: exact mass (mass_tokens None or the page size) sums a masked row sum a page (the block path) for
    heads of <= BLOCK_PATH_MAX_HEAD_DIM dimensions in tiles of <= BLOCK_PATH_MAX_PAGES pages, and keeps the page
    one-hot product otherwise; 64-key blocks always take the block path. The same output and mass as the reference
    either way, and through StepMass."""
    planned = []
    plan = paged_attention._plan_launch
    monkeypatch.setattr(paged_attention, "_plan_launch", lambda *a, **kw: planned.append(plan(*a, **kw)) or planned[-1])
    torch.manual_seed(51 + head_dim)
    q, k, v, table, lens = make_inputs(2, 5, 2, 3, head_dim, [300, 130], torch.float32)
    scale = head_dim ** -0.5
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True,
                                                  mass_tokens=mass_tokens)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=mass_tokens,
                                                num_splits=num_splits, launch=launch)
    block_n = planned[-1][0].block_n
    assert planned[-1][2] == (mass_tokens == 64 or head_dim <= paged_attention.BLOCK_PATH_MAX_HEAD_DIM
                              and block_n // 16 <= paged_attention.BLOCK_PATH_MAX_PAGES)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4
    step = paged_attention.StepMass(1)
    paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=mass_tokens,
                                    num_splits=num_splits, launch=launch, step_mass=step, layer=0)
    assert torch.allclose(step.finish(torch.zeros(1, *mass.shape), lens)[0], mass, atol=1e-6)


@pytest.mark.parametrize("mass_tokens", [None, 64], ids=["page", "block64"])
def test_page_mass_written_into_a_layer_of_a_callers_buffer(mass_tokens):
    """mass_out: the mass lands in one layer's slot of a bigger [layers, batch, kv_heads, pages] buffer, equal to
    the mass the kernel returns on its own; the other layers and the pages past the context stay untouched."""
    torch.manual_seed(46)
    q, k, v, table, lens = make_inputs(*MASS_CASES[2], torch.float32)
    scale = MASS_CASES[2][4] ** -0.5
    _, alone = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=mass_tokens)
    buffer = torch.full((3, q.shape[0], k.shape[2], alone.shape[-1] + 5), -7.0)
    _, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=mass_tokens,
                                              mass_out=buffer[1])
    assert mass.data_ptr() == buffer[1].data_ptr()
    assert torch.equal(buffer[1, :, :, : alone.shape[-1]], alone)
    assert (buffer[[0, 2]] == -7).all() and (buffer[1, :, :, alone.shape[-1]:] == -7).all()


@pytest.mark.parametrize("mass_tokens", [None, 64], ids=["page", "block64"])
@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one-split"])
def test_step_mass_finishes_every_layer_in_one_launch(mass_tokens, num_splits):
    """StepMass: three layers over their own K/V leave their partials, one launch finishes them all; each layer's
    mass equals the one its own call returns, outputs are unchanged, and pages past the context stay untouched."""
    torch.manual_seed(47)
    batch, q_len, kv_heads, group, dim, lens = MASS_CASES[2]
    layers = [make_inputs(batch, q_len, kv_heads, group, dim, lens, torch.float32) for _ in range(3)]
    table, lens_t = layers[0][3], layers[0][4]
    scale = dim ** -0.5
    alone = [paged_attention.paged_attention(q, k, v, table, lens_t, scale, page_mass=True, mass_tokens=mass_tokens,
                                             num_splits=num_splits) for q, k, v, _, _ in layers]
    pages = alone[0][1].shape[-1]
    buffer = torch.full((3, batch, kv_heads, pages + 5), -7.0)
    step = paged_attention.StepMass(3)
    for i, (q, k, v, _, _) in enumerate(layers):
        out, none = paged_attention.paged_attention(q, k, v, table, lens_t, scale, page_mass=True,
                                                    mass_tokens=mass_tokens, num_splits=num_splits,
                                                    step_mass=step, layer=i)
        assert none is None and torch.equal(out, alone[i][0])
    mass = step.finish(buffer, lens_t)
    assert mass.data_ptr() == buffer.data_ptr()
    for i in range(3):
        assert torch.allclose(buffer[i, :, :, :pages], alone[i][1], atol=1e-6)
    assert (buffer[..., pages:] == -7).all()
    assert not torch.allclose(buffer[0, :, :, :pages], buffer[1, :, :, :pages])   # each layer its own mass


def test_step_mass_refuses_a_step_with_a_layer_missing_or_a_wrong_buffer():
    torch.manual_seed(48)
    q, k, v, table, lens = make_inputs(*MASS_CASES[2], torch.float32)
    step = paged_attention.StepMass(2)
    paged_attention.paged_attention(q, k, v, table, lens, 0.25, page_mass=True, step_mass=step, layer=0)
    with pytest.raises(RuntimeError, match=r"layers \[1\]"):
        step.finish(torch.zeros(2, q.shape[0], k.shape[2], table.shape[1]), lens)
    paged_attention.paged_attention(q, k, v, table, lens, 0.25, page_mass=True, step_mass=step, layer=1)
    with pytest.raises(ValueError, match="fp32"):
        step.finish(torch.zeros(3, q.shape[0], k.shape[2], table.shape[1]), lens)
    with pytest.raises(ValueError, match="outside"):
        paged_attention.paged_attention(q, k, v, table, lens, 0.25, page_mass=True, step_mass=step, layer=2)
    with pytest.raises(ValueError, match="dense attention"):
        paged_attention.paged_attention(q, k, v, table, lens, 0.25, step_mass=step, layer=0)


@pytest.mark.parametrize("subtiles", [False, True], ids=["tile-per-block", "two-blocks-per-128-key-tile"])
def test_block_mass_of_many_tiles_in_one_split(subtiles, monkeypatch):
    """2,500 keys = 40 tiles of 64 in the one split requested: each tile stores its own block sums as it goes
    (with sub-tiles: 20 tiles of 128, the last one's second block past the keys)."""
    monkeypatch.setattr(paged_attention, "BLOCK_MASS_SUBTILES", subtiles)
    torch.manual_seed(44)
    q, k, v, table, lens = make_inputs(2, 5, 1, 2, 16, [2500, 1700], torch.float32)
    scale = 0.25
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64,
                                                num_splits=1)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4


def test_deferred_page_mass_holds_fewer_tiles_for_taller_query_blocks():
    assert [paged_attention.page_mass_tiles(rows) for rows in (16, 32, 64)] == [16, 16, 8]
    # page sums by warp: 8 slots a 64-key tile, 8 tiles at any block (the sweep's choice)
    assert {paged_attention.page_mass_tiles(rows, by_warp=True) for rows in (16, 32, 64)} == {8}


def test_page_mass_with_more_tiles_than_a_split_can_hold(monkeypatch):
    """2,500 keys in one requested split: deferred page mass waits in registers for at most MAX_PAGE_MASS_TILES
    tiles, so the kernel must add splits; dense (by the one-hot, as larger heads take it) and over a page list."""
    monkeypatch.setattr(paged_attention, "BLOCK_PATH_MAX_HEAD_DIM", 0)
    planned = []
    plan = paged_attention._plan_launch
    monkeypatch.setattr(paged_attention, "_plan_launch", lambda *a, **kw: planned.append(plan(*a, **kw)) or planned[-1])
    torch.manual_seed(45)
    q, k, v, table, lens = make_inputs(2, 5, 1, 2, 16, [2500, 1700], torch.float32)
    deferred = paged_attention.DEFAULT_LAUNCH
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, 0.25, page_mass=True)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, 0.25, page_mass=True, num_splits=1,
                                                launch=deferred)
    _, splits, by_blocks, defer, max_tiles = planned[-1]
    assert defer and not by_blocks and splits == -(-2500 // (64 * max_tiles)) > 1
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4
    sel, counts = random_selection(2, 1, [2500, 1700], keep=0.9)
    _, ref_mass = reference.paged_attention(q, k, v, table, lens, 0.25, page_mass=True, selected_pages=sel,
                                            selected_counts=counts)
    _, mass = paged_attention.paged_attention(q, k, v, table, lens, 0.25, page_mass=True, selected_pages=sel,
                                              selected_counts=counts, num_splits=1, launch=deferred)
    assert (mass - ref_mass).abs().max().item() < 1e-4


SPARSE_CASES = MASS_CASES + CASES[4:5]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=[f"b{c[0]}-q{c[1]}-g{c[3]}" for c in SPARSE_CASES])
def test_sparse_pages_match_reference(case):
    torch.manual_seed(20 + len(case[5]))
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    sel, counts = random_selection(case[0], case[2], case[5], keep=0.4)
    scale = case[4] ** -0.5
    ref = reference.paged_attention(q, k, v, table, lens, scale, selected_pages=sel, selected_counts=counts)
    out = paged_attention.paged_attention(q, k, v, table, lens, scale, selected_pages=sel, selected_counts=counts)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    phys = paged_attention.physical_pages(table, sel)          # the same lists, read without the table lookup
    by_phys = paged_attention.paged_attention(q, k, v, table, lens, scale, selected_pages=sel,
                                              selected_counts=counts, selected_physical=phys)
    assert torch.equal(by_phys, out)
    if case[1] <= 16:
        ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True,
                                                      selected_pages=sel, selected_counts=counts)
        out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True,
                                                    selected_pages=sel, selected_counts=counts)
        assert (mass - ref_mass).abs().max().item() < 1e-4
        _, mass_phys = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True,
                                                       selected_pages=sel, selected_counts=counts,
                                                       selected_physical=phys)
        assert torch.equal(mass_phys, mass)


def test_physical_lists_must_match_a_page_list():
    q, k, v, table, lens = make_inputs(1, 1, 2, 2, 16, [40], torch.float32)
    sel, counts = random_selection(1, 2, [40], keep=1.0)
    with pytest.raises(ValueError, match="selected_physical"):
        paged_attention.paged_attention(q, k, v, table, lens, 0.25, selected_physical=sel)
    with pytest.raises(ValueError, match="selected_physical"):
        paged_attention.paged_attention(q, k, v, table, lens, 0.25, selected_pages=sel, selected_counts=counts,
                                        selected_physical=sel[..., :1])


def test_selecting_every_page_equals_dense():
    torch.manual_seed(5)
    q, k, v, table, lens = make_inputs(2, 3, 2, 4, 16, [70, 33], torch.float32)
    sel, counts = random_selection(2, 2, [70, 33], keep=1.0)
    dense = paged_attention.paged_attention(q, k, v, table, lens, 0.25)
    sparse = paged_attention.paged_attention(q, k, v, table, lens, 0.25, selected_pages=sel, selected_counts=counts)
    assert (dense - sparse).abs().max().item() < 1e-5


def attention_like(rows, n, seed):
    """Peaked, attention-like weights with some exact ties, normalised per row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(rows, n, generator=g) * 3, dim=-1)
    w[:, 5:9] = w[:, 5:6]                   # ties
    return w


# (search, row held in registers)
TOPP_PATHS = [("bisect", True), ("bisect", False), ("bisect-full", True), ("bisect-full", False)]


@pytest.mark.parametrize("n", [7, 300, 5000])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.97, 0.999, 1.0])
@pytest.mark.parametrize("search,in_registers", TOPP_PATHS)
def test_topp_selects_the_minimal_set_reaching_p(n, p, search, in_registers, monkeypatch):
    from specattn.kernels import topp
    if not in_registers:      # rows longer than this are streamed from memory on every halving
        monkeypatch.setattr(topp, "ROW_IN_REGISTERS", 4)
    w = attention_like(6, n, seed=n)
    theta = topp.topp_threshold(w, p, search)
    keep = w >= theta[:, None]
    mass = (w * keep).sum(-1)
    assert (mass >= p * w.sum(-1) * (1 - 1e-6)).all()                    # reaches p
    smallest_kept = torch.where(keep, w, float("inf")).amin(-1)
    ties = (w == smallest_kept[:, None]).sum(-1)
    without_ties = mass - ties * smallest_kept
    assert (without_ties < p * w.sum(-1) * (1 + 1e-6)).all()               # minimal up to ties at theta
    ref_keep = w >= reference.topp_threshold(w, p)[:, None]
    assert ((keep.sum(-1) - ref_keep.sum(-1)).abs() <= ties).all()         # same size as sorting, within ties


@pytest.mark.parametrize("k", [1, 10, 64])
@pytest.mark.parametrize("search,in_registers", TOPP_PATHS)
def test_topk_threshold_matches_torch_topk(k, search, in_registers, monkeypatch):
    from specattn.kernels import topp
    if not in_registers:
        monkeypatch.setattr(topp, "ROW_IN_REGISTERS", 4)
    w = attention_like(4, 1000, seed=k)
    theta = topp.topk_threshold(w, k, search)
    assert torch.equal(theta, reference.topk_threshold(w, k))


@pytest.mark.parametrize("in_registers", [True, False])
@pytest.mark.parametrize("check_every_halving", [False, True])
def test_bisection_stopping_at_one_key_gives_the_threshold_of_every_halving(in_registers, check_every_halving,
                                                                             monkeypatch):
    """The early exit must not change a bit of the answer: rows from flat (one value: no exit) to peaked, with
    ties at and near the threshold and near neighbours, top-p and top-k. Checking after every halving (a negative
    margin) shows that the check alone keeps it exact, whatever the sums suggest."""
    from specattn.kernels import topp
    if not in_registers:
        monkeypatch.setattr(topp, "ROW_IN_REGISTERS", 4)
    if check_every_halving:
        monkeypatch.setattr(topp, "EXIT_MARGIN", -1e3)
    g = torch.Generator().manual_seed(11)
    w = torch.cat([torch.softmax(torch.randn(4, 3000, generator=g) * s, dim=-1) for s in (0.0, 1.0, 3.0, 6.0)])
    w[8:12, 100:140] = w[8:12, 100:101]                        # a run of ties in mid-row
    w[12:, 7] = w[12:, 8] * (1 + 2 ** -22)                     # neighbours one ulp or so apart
    for p in (0.3, 0.9, 0.95, 0.99):
        early, full = topp.topp_threshold(w, p, "bisect"), topp.topp_threshold(w, p, "bisect-full")
        assert torch.equal(early, full), p
    for k in (1, 37, 1000):
        assert torch.equal(topp.topk_threshold(w, k, "bisect"), reference.topk_threshold(w, k)), k


def test_unknown_search_is_a_clear_error():
    from specattn.kernels import topp
    with pytest.raises(ValueError, match="search must be one of"):
        topp.topp_threshold(torch.rand(2, 10), 0.9, "sorting")


@pytest.mark.parametrize("group", [1, 4])
def test_quest_scores_match_reference_and_bound_every_key(group):
    from specattn.kernels import quest
    torch.manual_seed(group)
    kv_heads, dim, page_size, lens = 2, 16, 16, [70, 200]
    q, k, v, table, lens_t = make_inputs(2, 1, kv_heads, group, dim, lens, torch.float32)
    kmin = k.amin(1)                                  # page bounds over all rows (every page full here)
    kmax = k.amax(1)
    got = quest.quest_page_scores(q[:, 0], kmin, kmax, table, lens_t)
    want = reference.quest_page_scores(q[:, 0], kmin, kmax, table, lens_t)
    assert torch.allclose(got, want, atol=1e-4)
    # The bound is >= q.k for every key of the page and every query head of the KV head.
    keys = reference.gather_pages(k, table, table.shape[1] * page_size)             # [b, hkv, L, d]
    qk = torch.einsum("bhgd,bhld->bhgl", q[:, 0].view(2, kv_heads, group, dim), keys).amax(2)
    page_max = qk.view(2, kv_heads, -1, page_size).amax(-1)
    assert (got[:, :, :5] >= page_max[:, :, :5] - 1e-4).all()
    assert torch.isinf(got[0, :, 5:]).all()                                        # past the 70-token sequence
    q3 = torch.randn(2, 3, kv_heads * group, dim)          # the last new token of a 3-token step: a strided view
    assert torch.allclose(quest.quest_page_scores(q3[:, -1], kmin, kmax, table, lens_t),
                          reference.quest_page_scores(q3[:, -1].contiguous(), kmin, kmax, table, lens_t), atol=1e-4)


@pytest.mark.parametrize("case", SPARSE_CASES[:3], ids=[f"b{c[0]}-q{c[1]}-g{c[3]}" for c in SPARSE_CASES[:3]])
def test_reads_before_the_pdl_wait_give_the_same_output(case, monkeypatch):
    """EARLY_PAGES 1 (lengths read and first page entries prefetched before the PDL wait; the prefetch is a no-op
    here) against 0: identical outputs, dense and sparse, page lists logical and physical, 3 splits."""
    torch.manual_seed(40 + case[1])
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    sel, counts = random_selection(case[0], case[2], case[5], keep=0.4)
    phys = paged_attention.physical_pages(table, sel)
    runs = {}
    for early in (1, 0):
        monkeypatch.setattr(paged_attention, "EARLY_PAGES", early)
        runs[early] = [paged_attention.paged_attention(q, k, v, table, lens, 0.25, num_splits=3, **kw)
                       for kw in ({}, dict(selected_pages=sel, selected_counts=counts),
                                  dict(selected_pages=sel, selected_counts=counts, selected_physical=phys))]
    for a, b in zip(runs[1], runs[0], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", SPARSE_CASES[:4], ids=[f"b{c[0]}-q{c[1]}-g{c[3]}" for c in SPARSE_CASES[:4]])
def test_token_lists_match_reference(case):
    torch.manual_seed(30 + case[1])
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    batch, q_len, kv_heads = case[0], case[1], case[2]
    n_max = max(case[5])
    sel = torch.full((batch, kv_heads, n_max), -1, dtype=torch.int32)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b, n in enumerate(case[5]):
        for h in range(kv_heads):
            old = torch.nonzero(torch.rand(n - q_len) < 0.3).flatten()           # some of the context
            tokens = torch.cat([old, torch.arange(n - q_len, n)]).int()          # + every new token
            sel[b, h, :len(tokens)] = tokens
            counts[b, h] = len(tokens)
    scale = case[4] ** -0.5
    ref = reference.paged_attention(q, k, v, table, lens, scale, selected_pages=sel, selected_counts=counts,
                                    token_level=True)
    out = paged_attention.paged_attention(q, k, v, table, lens, scale, selected_pages=sel, selected_counts=counts,
                                          token_level=True)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("batch,kv_heads,pages,k", [(2, 3, 40, 10), (1, 2, 33, 50), (3, 1, 100, 17), (2, 8, 513, 32)])
def test_quest_top_pages_without_sorting_equal_the_sorted_ones(batch, kv_heads, pages, k):
    """quest.select_top_pages against selection.top_pages (topk + sort): forced pages always in, invalid pages and
    -inf scores never, fewer than k candidates, a sequence with none at all, negative and positive scores."""
    from specattn.kernels import quest
    from specattn.selection import top_pages
    torch.manual_seed(pages)
    score = torch.randn(batch, kv_heads, pages) * 3 - 2         # the k-th best is negative in some rows
    score[0, 0, :5] = float("-inf")
    forced = torch.rand(batch, pages) < 0.05
    valid = torch.rand(batch, pages) < 0.8
    valid[-1, :] = batch == 1           # the last sequence of a batch has no valid page
    ref_pages, ref_counts = top_pages(score, forced, valid, k)
    got_pages, got_counts = quest.select_top_pages(score, forced, valid, k)
    assert torch.equal(got_pages, ref_pages) and torch.equal(got_counts, ref_counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,kv_heads,dim", [(1, 2, 16), (5, 3, 64), (20, 1, 32)])
def test_key_bounds_update_matches_reference(dtype, q_len, kv_heads, dim):
    """Pages a step of q_len tokens wrote (one page, two, or three for a step longer than a page), lengths that
    end mid-page and on a page boundary; rows past a sequence's length hold garbage that must not count."""
    from specattn.kernels import quest
    torch.manual_seed(q_len)
    _, k, _, table, lens = make_inputs(3, 1, kv_heads, 1, dim, [40, 48, 21], dtype)
    table = torch.randperm(k.shape[0])[:table.numel()].view(table.shape).int()     # no page in two sequences
    bounds = [torch.randn(k.shape[0], kv_heads, dim, dtype=dtype) for _ in range(2)]
    ref = [b.clone() for b in bounds]
    reference.update_key_bounds(k, *ref, table, lens, q_len)
    quest.update_key_bounds(k, *bounds, table, lens, q_len)
    assert torch.equal(bounds[0], ref[0]) and torch.equal(bounds[1], ref[1])
    last = table[1, 47 // 16].long()        # sequence 1 ends on a page boundary: its last page is all valid
    assert torch.equal(bounds[0][last], k[last].amin(0))
    partial = table[0, 39 // 16].long()     # sequence 0 ends mid-page: rows 8..15 of its last page do not count
    assert torch.equal(bounds[1][partial], k[partial, :8].amax(0))


@pytest.mark.parametrize("case", [(2, 5, 2, 4, 16, [100, 37]), (1, 1, 1, 1, 32, [70]), (3, 3, 1, 8, 16, [20, 64, 5])],
                         ids=["b2-q5-g4", "b1-q1-g1", "b3-q3-g8"])
@pytest.mark.parametrize("num_splits", [None, 1])          # 1: the log-sum-exp comes from the split kernel
def test_vegas_two_row_scores_kernel_matches_reference(case, num_splits):
    """Scores from the verify pass's log-sum-exp and one read of K == softmax of the first and last rows."""
    from specattn.kernels import token_scores
    torch.manual_seed(60 + case[1])
    q, k, v, table, lens = make_inputs(*case, torch.float32)
    scale = case[4] ** -0.5
    out, lse = paged_attention.paged_attention(q, k, v, table, lens, scale, return_lse=True, num_splits=num_splits)
    got = token_scores.two_row_token_scores(q, k, table, lens, lse, scale)
    ref = reference.two_row_token_scores(q, k, table, lens, scale)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5
    assert torch.allclose(got.sum(-1), torch.ones(case[0]), atol=1e-4)      # each row's weights sum to one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (9, 3, 64), (6, 1, 40)])
def test_fused_rope_and_kv_write_matches_reference(dtype, heads, kv_heads, dim):
    from specattn.kernels import rope_kv
    from specattn.model import rope_tables
    torch.manual_seed(heads)
    b, t, pages, page_size = 2, 3, 6, 4
    qkv_full = torch.randn(b, t, (heads + 2 * kv_heads) * dim + 8, dtype=dtype)
    qkv = qkv_full[..., 8:]                                     # rows strided, as a slice of a bigger output
    positions = torch.tensor([[5, 6, 7], [0, 1, 2]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    cos, sin = rope_tables(positions, inv_freq, dtype)
    slots = torch.randperm(pages * page_size)[: b * t]
    pools = [torch.zeros(pages, page_size, kv_heads, dim, dtype=dtype) for _ in range(4)]
    want_q = reference.rope_and_write_kv(qkv, cos, sin, pools[0], pools[1], slots, heads, kv_heads)
    got_q = rope_kv.rope_and_write_kv(qkv, cos, sin, pools[2], pools[3], slots, heads, kv_heads)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got_q.float(), want_q.float(), atol=tol, rtol=tol)
    assert torch.allclose(pools[2].float(), pools[0].float(), atol=tol, rtol=tol)
    assert torch.equal(pools[3], pools[1])                      # values are copied, not computed
    assert pools[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rope_and_kv_write_of_an_unnormed_projection_matches_reference(dtype, with_bias):
    """Folded norms (Transformer.fold_norms): the kernel scales each row by 1 / rms of the rows the projection
    read, adds the bias, then rotates and writes; values are scaled too."""
    from specattn.kernels import rope_kv
    from specattn.model import rope_tables
    torch.manual_seed(11)
    heads, kv_heads, dim, hidden, b, t = 6, 2, 16, 72, 2, 3
    qkv = torch.randn(b, t, (heads + 2 * kv_heads) * dim, dtype=dtype)
    x = (torch.randn(b, t, hidden) * torch.tensor([0.5, 3.0, 8.0])[None, :, None]).to(dtype)   # rms per row differ
    bias = torch.randn((heads + 2 * kv_heads) * dim, dtype=dtype) if with_bias else None
    cos, sin = rope_tables(torch.tensor([[3, 4, 5], [9, 10, 11]]), 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim)),
                           dtype)
    slots = torch.randperm(24)[: b * t]
    pools = [torch.zeros(6, 4, kv_heads, dim, dtype=dtype) for _ in range(4)]
    want_q = reference.rope_and_write_kv(qkv, cos, sin, pools[0], pools[1], slots, heads, kv_heads, x, 1e-5, bias)
    got_q = rope_kv.rope_and_write_kv(qkv, cos, sin, pools[2], pools[3], slots, heads, kv_heads, x, 1e-5, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((got_q, want_q), (pools[2], pools[0]), (pools[3], pools[1])):
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    unscaled = reference.rope_and_write_kv(qkv, cos, sin, pools[0], pools[1], slots, heads, kv_heads)
    assert not torch.allclose(unscaled.float(), want_q.float(), atol=0.1)      # the scale matters here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("b, t, heads, kv_heads, dim, hidden", [(1, 1, 6, 2, 16, 72), (2, 1, 4, 4, 40, 300),
                                                               (1, 2, 9, 3, 64, 576), (2, 3, 6, 2, 16, 72),
                                                               (4, 5, 9, 3, 64, 100)])
def test_projection_rope_and_kv_write_in_one_kernel_matches_reference(dtype, with_bias, b, t, heads, kv_heads, dim,
                                                                      hidden):
    """The q/k/v product of unnormed rows, its 1 / rms scale, bias, rotation and cache write in one kernel (a step's
    first launch; 6 and 20 rows on tensor cores) against the reference of each part, from the same product."""
    from specattn.kernels import rope_kv
    from specattn.model import rope_tables
    torch.manual_seed(dim + hidden)
    width = (heads + 2 * kv_heads) * dim
    x = (torch.randn(b, t, hidden) * (1 + 3 * torch.arange(b * t)).view(b, t, 1)).to(dtype)
    w = (torch.randn(width, hidden) / hidden ** 0.5).to(dtype)
    bias = torch.randn(width, dtype=dtype) if with_bias else None
    positions = torch.arange(b * t).view(b, t) * 7 + 3
    cos, sin = rope_tables(positions, 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim)), dtype)
    slots = torch.randperm(24)[: b * t]
    pools = [torch.zeros(6, 4, kv_heads, dim, dtype=dtype) for _ in range(4)]
    product = torch.nn.functional.linear(x.float(), w.float()).to(dtype)      # rounded, as F.linear hands it over
    want_q = reference.rope_and_write_kv(product, cos, sin, pools[0], pools[1], slots, heads, kv_heads, x.float(),
                                         1e-5, bias)
    got_q = rope_kv.project_rope_and_write_kv(x, w, cos, sin, pools[2], pools[3], slots, heads, kv_heads, 1e-5,
                                              bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got_q.shape == (b, t, heads, dim) and got_q.dtype == dtype
    for got, want in ((got_q, want_q), (pools[2], pools[0]), (pools[3], pools[1])):
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    assert pools[2].abs().sum() > 0 and pools[3].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, inter", [(3, 64, 96), (1, 200, 1500), (5, 576, 1536)])
def test_swiglu_of_an_unnormed_projection_matches_reference(dtype, rows, hidden, inter):
    from specattn.kernels import swiglu
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * inter, dtype=dtype) * 4
    x = (torch.randn(rows, hidden) * (1 + torch.arange(rows))[:, None]).to(dtype)
    want = reference.swiglu_rms(gate_up, x, 1e-6)
    got = swiglu.swiglu_rms(gate_up, x, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (rows, inter) and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    plain = torch.nn.functional.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()
    assert not torch.allclose(plain, want.float(), atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, hidden, inter", [(1, 72, 100), (2, 300, 64), (5, 72, 100), (33, 40, 24)])
def test_gate_up_product_with_swiglu_in_one_kernel_matches_reference(dtype, rows, hidden, inter):
    """The gate/up product of unnormed rows with the rows' 1 / rms and SwiGLU applied in the same kernel (a small
    step's MLP input) against the SwiGLU reference of the rounded product."""
    from specattn.kernels import swiglu
    torch.manual_seed(rows + inter)
    x = (torch.randn(rows, hidden) * (1 + 4 * torch.arange(rows))[:, None]).to(dtype)
    w = (torch.randn(2 * inter, hidden) / hidden ** 0.5).to(dtype)
    product = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    want = reference.swiglu_rms(product, x, 1e-6)
    got = swiglu.project_swiglu_rms(x, w, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (rows, inter) and got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


def test_reference_rope_and_write_equals_the_models_rotation():
    from specattn.model import apply_rope, rope_tables
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    qkv = torch.randn(1, 5, (heads + 2 * kv_heads) * dim)
    cos, sin = rope_tables(torch.arange(5)[None], 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)),
                           torch.float32)
    k_pool, v_pool = torch.zeros(2, 4, kv_heads, dim), torch.zeros(2, 4, kv_heads, dim)
    q = reference.rope_and_write_kv(qkv, cos, sin, k_pool, v_pool, torch.arange(5), heads, kv_heads)
    q_want, k_want, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    assert torch.allclose(q, apply_rope(q_want.reshape(1, 5, heads, dim), cos, sin), atol=1e-6)
    assert torch.allclose(k_pool.reshape(-1, kv_heads, dim)[:5], apply_rope(k_want.reshape(1, 5, kv_heads, dim),
                                                                            cos, sin)[0], atol=1e-6)



@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_block_mass_spanning_two_tiles_matches_reference(num_splits):
    """64-key blocks over 32-key tiles (the launch for 64-row verify tiles): the split kernel carries a block's row
    sums over its two tiles, rescaled like l_i, and stores them at the block's last tile; splits hold whole blocks,
    some splits stay empty (3 splits of 2-4 tiles), and sequences end inside a block (lengths 37, 100, 23)."""
    torch.manual_seed(7)
    q, k, v, table, lens = make_inputs(3, 5, 2, 4, 16, [37, 100, 23], torch.float32)
    scale = 16 ** -0.5
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64,
                                                launch=paged_attention.LaunchConfig(block_n=32),
                                                num_splits=num_splits)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4


def test_wide_query_tiles_take_narrow_key_tiles_and_match_reference():
    """Verify blocks of 64 query rows at head_dim 128 (8 query heads x 5 new tokens) launch 32-key tiles; 32-row
    blocks, head_dim 64, sparse lists and prefill keep their launch. Output and 64-key block mass match the
    reference there."""
    plan = paged_attention._plan_launch
    assert plan(32, 1, 128, 16, 512, 132, None, None, True, 64, False, 64)[0].block_n == 32
    assert plan(32, 1, 128, 16, 512, 132, None, None, True, 64, False, 32)[0].block_n != 32
    assert plan(32, 1, 64, 16, 512, 132, None, None, True, 64, False, 64)[0].block_n != 32
    assert plan(32, 1, 128, 16, 512, 132, None, None, False, None, True, 64)[0].block_n != 32
    assert plan(2, 1, 128, 16, 512, 132, None, None, True, 64, False, 64)[0].block_n != 32    # few programs
    torch.manual_seed(3)
    lens = [150, 61] + [17 + i for i in range(30)]
    q, k, v, table, lens = make_inputs(32, 5, 1, 8, 128, lens, torch.float32)
    scale = 128 ** -0.5
    ref_out, ref_mass = reference.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64)
    out, mass = paged_attention.paged_attention(q, k, v, table, lens, scale, page_mass=True, mass_tokens=64)
    assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
    assert (mass - ref_mass).abs().max().item() < 1e-4
    q_prefill = torch.randn(2, 40, 8, 128)
    want = reference.paged_attention(q_prefill, k, v, table[:2], lens[:2], scale)
    got = paged_attention.paged_attention(q_prefill, k, v, table[:2], lens[:2], scale)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_sparse_small_heads_filling_the_sms_take_one_split_of_wide_tiles(monkeypatch):
    """With SPARSE_SMALL_HEADS_FULL_WAVE set (off by default), sparse lists at head_dim 64 whose (sequence, KV
    head) pairs alone fill the SMs (132 here) run one split of 256-key tiles that writes its output directly;
    output and per-page mass match the reference."""
    monkeypatch.setattr(paged_attention, "SPARSE_SMALL_HEADS_FULL_WAVE", paged_attention.FULL_WAVE_CANDIDATE)
    torch.manual_seed(1)
    batch, kv_heads, dim, lens = 44, 3, 64, [300 - 5 * b for b in range(44)]
    q, k, v, table, lens_t = make_inputs(batch, 1, kv_heads, 3, dim, lens, torch.float32)
    sel, counts = random_selection(batch, kv_heads, lens, keep=0.6)
    plan = paged_attention._plan_launch
    launch, splits, *_ = plan(batch, kv_heads, dim, 16, sel.shape[2] * 16, 132, None, None, False, None, True)
    assert (launch, splits) == (paged_attention.SPARSE_SMALL_HEADS_FULL_WAVE, 1)
    assert plan(batch - 1, kv_heads, dim, 16, sel.shape[2] * 16, 132, None, None, False, None, True)[0] \
        == paged_attention.SPARSE_SMALL_HEADS
    kw = {"selected_pages": sel, "selected_counts": counts, "page_mass": True}
    out, mass = paged_attention.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw)
    want, want_mass = reference.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass, want_mass, atol=1e-4, rtol=1e-4)


def test_sparse_lists_at_head_dim_128_take_wide_tiles_and_match_reference():
    """Many (sequence, KV head) pairs at head_dim 128 with one or five new rows of 4-head groups (8B-shaped sparse
    drafting and pruned verification) take SPARSE_MANY_PROGRAMS' 128-key tiles; 64-row query blocks (8-head groups,
    five rows) keep the default launch. All match the reference, with logical and physical lists."""
    torch.manual_seed(3)
    batch, kv_heads, dim, lens = 8, 4, 128, [600 - 37 * b for b in range(8)]
    plan = paged_attention._plan_launch
    many, default = paged_attention.SPARSE_MANY_PROGRAMS, paged_attention.DEFAULT_LAUNCH
    for q_len, group, want_launch in ((1, 4, many), (5, 4, many), (5, 8, default)):
        q, k, v, table, lens_t = make_inputs(batch, q_len, kv_heads, group, dim, lens, torch.float32)
        sel, counts = random_selection(batch, kv_heads, lens, keep=0.3, seed=q_len + group)
        block_m, _ = paged_attention.query_tiling(q_len, group)
        launch, *_ = plan(batch, kv_heads, dim, 16, sel.shape[2] * 16, 132, None, None, False, None, True, block_m)
        assert launch == want_launch
        assert launch.block_n == (128 if want_launch is many else 64)
        kw = {"selected_pages": sel, "selected_counts": counts}
        want = reference.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw)
        phys = paged_attention.physical_pages(table, sel)
        for extra in ({}, {"selected_physical": phys}):
            out = paged_attention.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw, **extra)
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_sparse_small_head_launch_splits_evenly_and_matches_reference(monkeypatch):
    """The default model's draft shape (many pairs, head_dim 64, a few hundred listed keys) takes the tuned
    sparse launch with a power-of-two split count; its output is the reference's, also capped at one split (the
    split kernel writing the output itself)."""
    torch.manual_seed(0)
    batch, kv_heads, dim, lens = 32, 3, 64, [700 - 5 * b for b in range(32)]
    q, k, v, table, lens_t = make_inputs(batch, 1, kv_heads, 3, dim, lens, torch.float32)
    sel, counts = random_selection(batch, kv_heads, lens, keep=0.4)
    launch, splits, *_ = paged_attention._plan_launch(batch, kv_heads, dim, 16, sel.shape[2] * 16, 132, None, None,
                                                      False, None, True)
    assert launch == paged_attention.SPARSE_SMALL_HEADS and splits & (splits - 1) == 0
    kw = {"selected_pages": sel, "selected_counts": counts}
    out = paged_attention.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw)
    want = reference.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(paged_attention, "SPARSE_SMALL_HEADS_MAX_SPLITS", 1)
    assert paged_attention._plan_launch(batch, kv_heads, dim, 16, sel.shape[2] * 16, 132, None, None, False, None,
                                        True)[1] == 1 < splits
    out = paged_attention.paged_attention(q, k, v, table, lens_t, dim ** -0.5, **kw)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_swept_tensor_core_tilings_reach_the_products_through_the_table(tmp_path, monkeypatch):
    """A sweep's winners (tune_gemv.py --tilings-out, read by gemv.load_dot_tilings) set the rows, columns, keys,
    warps and stages of tensor-core products by (rows rounded up to a power of two, N, K); the plain product and the
    two fused ones (q/k/v with rotation and cache write, gate/up with SwiGLU) still match their references with
    16-row blocks and 32-column programs (16 rotation or SwiGLU pairs)."""
    import json

    from specattn.kernels import gemv, rope_kv, swiglu
    from specattn.model import rope_tables
    heads, kv_heads, dim, hidden, inter, b, t = 2, 1, 32, 48, 40, 3, 7      # 21 rows: two blocks of 16
    width = (heads + 2 * kv_heads) * dim
    tiling = {"block_n": 32, "block_k": 32, "num_warps": 4, "block_m": 16, "num_stages": 2}
    path = tmp_path / "tilings.json"
    path.write_text(json.dumps([{"m": 21, "n": width, "k": hidden, "tiling": tiling},
                                {"m": 21, "n": 2 * inter, "k": hidden, "tiling": tiling}]))
    table = gemv.load_dot_tilings(str(path))
    assert table[(32, width, hidden)] == gemv.GemvTiling(**tiling)
    from specattn.errors import InvalidInputError
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"m": 21, "n": width, "tiling": tiling}]))      # no "k"
    for wrong in (bad, tmp_path / "missing.json"):
        with pytest.raises(InvalidInputError, match="SPECATTN_GEMV_DOT_TILINGS"):
            gemv.load_dot_tilings(str(wrong))
    monkeypatch.setattr(gemv, "DOT_TILINGS", table)
    assert gemv.choose_tiling(b * t, width, hidden).block_m == 16
    assert gemv.row_blocks(b * t, gemv.choose_tiling(b * t, width, hidden)) == gemv.RowBlocks(16, 2, True)
    assert gemv.choose_tiling(b * t, 96, hidden) == gemv.GemvTiling(32, 64, 4)        # not in the table
    torch.manual_seed(5)
    x = torch.randn(b, t, hidden)
    w = torch.randn(width, hidden) / hidden ** 0.5
    rows = x.view(b * t, hidden)
    want = torch.nn.functional.linear(rows, w)
    assert ((gemv.gemv(rows, w) - want).norm() / want.norm()).item() < 1e-5
    positions = torch.arange(b * t).view(b, t) + 11
    cos, sin = rope_tables(positions, 1.0 / (10000 ** (torch.arange(0, dim, 2) / dim)), torch.float32)
    slots = torch.randperm(32)[: b * t]
    pools = [torch.zeros(8, 4, kv_heads, dim) for _ in range(4)]
    want_q = reference.rope_and_write_kv(want.view(b, t, width), cos, sin, pools[0], pools[1], slots, heads,
                                         kv_heads, x, 1e-5)
    got_q = rope_kv.project_rope_and_write_kv(x, w, cos, sin, pools[2], pools[3], slots, heads, kv_heads, 1e-5)
    for got, ref in ((got_q, want_q), (pools[2], pools[0]), (pools[3], pools[1])):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    w_gu = torch.randn(2 * inter, hidden) / hidden ** 0.5
    want_act = reference.swiglu_rms(torch.nn.functional.linear(rows, w_gu), rows, 1e-6)
    assert torch.allclose(swiglu.project_swiglu_rms(rows, w_gu, 1e-6), want_act, atol=1e-5, rtol=1e-5)

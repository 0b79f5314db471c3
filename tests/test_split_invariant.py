"""A clip split over N GPUs computes what one GPU computes (issue 14), on CPU with fakes shaped like
LightX2V's objects: SageAttention's key mean in fixed head groups, the cross-attention in one GPU's
query blocks (a blockwise-quantising attention stands in for SageAttention, a fake process group for
NCCL), and the DiT head in slices every split shares (a linear whose result depends on its row
count stands in for cuBLAS)."""

from __future__ import annotations

import types

import pytest

from pipeline.backends import kernels
from pipeline.backends import lightx2v_compat as compat


@pytest.fixture(autouse=True)
def opt_in_named(monkeypatch):
    """The changes under test here are opt-in (lightx2v_compat.OPT_IN_NAMES): off unless named.
    Every test names them, but the one about that gate."""
    monkeypatch.setenv(compat.OPT_IN_ENV, ",".join(sorted(compat.OPT_IN_NAMES)))

torch = pytest.importorskip("torch")

ROWS = compat.SAGE_QUERY_ROWS


@pytest.mark.parametrize("heads, group", [(40, 5), (12, 3), (6, 3), (7, 7), (16, 2)])
def test_head_group_divides_every_split_of_the_heads(heads, group):
    assert kernels.split_invariant_head_group(heads) == group
    for ranks in (1, 2, 4, 8):
        if heads % ranks == 0 and ranks <= heads // group:
            assert (heads // ranks) % group == 0


def test_keys_smoothed_per_group_are_each_heads_keys_minus_their_mean():
    k = torch.randn(300, 8, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = k - k.mean(dim=0, keepdim=True)
    shard = k[:, 4:].clone()
    out = kernels.keys_smoothed_by_head_groups(k, 2)
    assert out is k and torch.equal(k, expected)  # in place, as SageAttention's own
    assert torch.equal(kernels.keys_smoothed_by_head_groups(shard, 2), k[:, 4:])  # a rank's heads: the same bits


class _SageCalls:
    """A SageAttention that records its options and the keys it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, tensor_layout="HND", smooth_k=True):
        if smooth_k:
            k -= k.mean(dim=1, keepdim=True)
        self.calls.append({"smooth_k": smooth_k, "k": k.clone()})
        return q


def test_selector_sage_smooths_keys_in_head_groups_and_can_be_undone():
    sage_fn = _SageCalls()
    selector = kernels.AttentionSelector(torch=torch, fns=kernels.attention_functions(torch, sage_fn),
                                         offered=[kernels.SAGE], baseline=kernels.SAGE, gpu_name="Fake GPU",
                                         versions="torch-test", force=kernels.SAGE)
    fixes = compat.CompatFixes()
    compat.sage_keys_smoothed_by_head_groups(fixes, selector, 40)
    assert fixes.has("sage_keys_smoothed_by_head_groups")
    q, k, v = (torch.randn(200, 20, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = k - k.mean(dim=0, keepdim=True)
    selector(q, k.clone(), v)
    assert sage_fn.calls[-1]["smooth_k"] is False
    assert torch.allclose(sage_fn.calls[-1]["k"][0], expected, atol=1e-6)
    with fixes.disabled("sage_keys_smoothed_by_head_groups"):
        selector(q, k.clone(), v)
        assert sage_fn.calls[-1]["smooth_k"] is True  # SageAttention's own mean
    skip = compat.CompatFixes(skip=frozenset({"sage_keys_smoothed_by_head_groups"}))
    other = kernels.AttentionSelector(torch=torch, fns=kernels.attention_functions(torch, sage_fn),
                                      offered=[kernels.SAGE], baseline=kernels.SAGE, gpu_name="Fake GPU",
                                      versions="torch-test")
    before = other.fns[kernels.SAGE]
    compat.sage_keys_smoothed_by_head_groups(skip, other, 40)
    compat.sage_keys_smoothed_by_head_groups(compat.CompatFixes(), None, 40)  # no selector: nothing
    assert other.fns[kernels.SAGE] is before and skip.names == []


# -- the cross-attention in one GPU's query blocks ------------------------------------------------


def _blockwise_attention(q, k, v):
    """SageAttention's arithmetic where the split shows: q quantised per block of ROWS rows counted
    from its first row (one scale a block and head), k smoothed in place. [L, H, D] -> [L, H*D]."""
    k -= k.mean(dim=0, keepdim=True)
    quantised = torch.empty_like(q)
    for start in range(0, q.shape[0], ROWS):
        block = q[start:start + ROWS]
        scale = block.abs().amax(dim=(0, 2), keepdim=True) / 7  # a coarse grid, so blocks matter
        quantised[start:start + ROWS] = torch.round(block / scale) * scale
    attn = torch.softmax(torch.einsum("lhd,mhd->hlm", quantised, k), dim=-1)
    return torch.einsum("hlm,mhd->lhd", attn, v).reshape(q.shape[0], -1)


class SageAttn2Weight:
    def __init__(self):
        self._modules = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        assert max_seqlen_q in (None, q.shape[0])
        return _blockwise_attention(q, k, v)


class _Group:
    """torch.distributed for one rank of a group whose every rank's queries the test knows."""

    def __init__(self, rank, slices):
        self.rank, self.slices, self.gathers = rank, slices, 0

    def get_world_size(self, group=None):
        return len(self.slices)

    def get_rank(self, group=None):
        return self.rank

    def all_gather_into_tensor(self, out, mine, group=None):
        self.gathers += 1
        edge = ROWS - 1
        for j, part in enumerate(self.slices):
            flat = part.reshape(part.shape[0], -1)
            out[j] = torch.cat((flat[:edge], flat[-edge:]))
        assert torch.equal(out[self.rank], mine)


class _WanModel:
    def __init__(self):
        self.seen = []

    def _seq_parallel_pre_process(self, pre_infer_out):
        self.seen.append(pre_infer_out.x.shape[0])
        return pre_infer_out


def _weights(module):
    return types.SimpleNamespace(_modules={"blocks": types.SimpleNamespace(
        _modules={"p1": types.SimpleNamespace(_modules={"cross_attn_1": module})})})


def _qkv(tokens, heads=3, dim=8, context=20):
    gen = torch.Generator().manual_seed(tokens)
    return (torch.randn(tokens, heads, dim, generator=gen), torch.randn(context, heads, dim, generator=gen),
            torch.randn(context, heads, dim, generator=gen))


def _split_run(q, k, v, ranks, fixes_for=lambda rank: compat.CompatFixes(), tokens=None):
    slices = list(q.chunk(ranks))
    outs, groups, all_fixes = [], [], []
    for rank in range(ranks):
        module, model, group, fixes = SageAttn2Weight(), _WanModel(), _Group(rank, slices), fixes_for(rank)
        compat.seq_cross_attention_in_one_gpu_blocks(fixes, model, _weights(module), dist=group, group="seq")
        model._seq_parallel_pre_process(types.SimpleNamespace(x=torch.zeros(tokens or q.shape[0], 1)))
        local = slices[rank]
        outs.append(module.apply(local, k.clone(), v, cu_seqlens_q=torch.tensor([0, local.shape[0]]),
                                 cu_seqlens_kv=None, max_seqlen_q=local.shape[0], max_seqlen_kv=k.shape[0]))
        groups.append(group)
        all_fixes.append(fixes)
    return torch.cat(outs), groups, all_fixes


@pytest.mark.parametrize("tokens, ranks", [(600, 2), (800, 4), (1024, 2), (520, 2), (1200, 8)])
def test_each_rank_computes_one_gpus_query_blocks(tokens, ranks):
    q, k, v = _qkv(tokens)
    one_gpu = _blockwise_attention(q, k.clone(), v)
    split, groups, fixes = _split_run(q, k, v, ranks)
    assert all(f.has("seq_cross_attention_in_one_gpu_blocks") for f in fixes)
    assert all(g.gathers == 1 for g in groups)
    assert torch.equal(split, one_gpu)


def test_without_the_fix_a_rank_whose_slice_starts_inside_a_block_computes_otherwise():
    q, k, v = _qkv(600)  # 300 tokens a rank: rank 1 starts 44 rows into a block
    one_gpu = _blockwise_attention(q, k.clone(), v)
    skip = lambda rank: compat.CompatFixes(skip=frozenset({"seq_cross_attention_in_one_gpu_blocks"}))  # noqa: E731
    upstream, groups, fixes = _split_run(q, k, v, 2, fixes_for=skip)
    assert fixes[0].names == [] and groups[0].gathers == 0
    assert not torch.equal(upstream[300:], one_gpu[300:])  # every block of rank 1
    assert not torch.equal(upstream[256:300], one_gpu[256:300])  # rank 0's last block


def test_the_fix_undone_runs_upstreams_cross_attention_and_padding_or_short_slices_keep_it():
    q, k, v = _qkv(600)
    slices = list(q.chunk(2))
    module, model, group, fixes = SageAttn2Weight(), _WanModel(), _Group(1, slices), compat.CompatFixes()
    compat.seq_cross_attention_in_one_gpu_blocks(fixes, model, _weights(module), group, group="seq")
    local = slices[1]
    model._seq_parallel_pre_process(types.SimpleNamespace(x=torch.zeros(600, 1)))
    with fixes.disabled("seq_cross_attention_in_one_gpu_blocks"):
        assert "apply" not in vars(module) and "_seq_parallel_pre_process" not in vars(model)
        assert torch.equal(module.apply(local, k.clone(), v), _blockwise_attention(local, k.clone(), v))
    assert model.seen == [600]
    model._seq_parallel_pre_process(types.SimpleNamespace(x=torch.zeros(599, 1)))  # padded to 600
    assert torch.equal(module.apply(local, k.clone(), v), _blockwise_attention(local, k.clone(), v))
    assert group.gathers == 0
    tiny = list(_qkv(200)[0].chunk(2))  # 100 rows a rank: fewer than a block
    short = _Group(0, tiny)
    compat.seq_cross_attention_in_one_gpu_blocks(compat.CompatFixes(), model, _weights(module), short, group="seq")
    model._seq_parallel_pre_process(types.SimpleNamespace(x=torch.zeros(200, 1)))
    assert torch.equal(module.apply(tiny[0], k.clone(), v), _blockwise_attention(tiny[0], k.clone(), v))
    assert short.gathers == 0


def test_cross_attention_fix_only_for_sage_on_a_group():
    class FlashAttn2Weight(SageAttn2Weight):
        pass

    fixes = compat.CompatFixes()
    compat.seq_cross_attention_in_one_gpu_blocks(fixes, _WanModel(), _weights(FlashAttn2Weight()), _Group(0, [1, 2]),
                                                 group="seq")
    compat.seq_cross_attention_in_one_gpu_blocks(fixes, _WanModel(), _weights(SageAttn2Weight()), _Group(0, [1, 2]),
                                                 group=None)
    compat.seq_cross_attention_in_one_gpu_blocks(fixes, _WanModel(), _weights(SageAttn2Weight()), _Group(0, [1]),
                                                 group="seq")
    assert fixes.names == []


# -- the DiT head in slices every split shares ----------------------------------------------------


class _Head:
    """A linear whose rounding depends on how many rows one call has, as cuBLAS's kernel choice."""

    def __init__(self):
        self._modules = {}
        self.calls = []

    def apply(self, x):
        self.calls.append(x.shape[0])
        return x.sum(dim=1, keepdim=True) + x.shape[0] * 1e-3


@pytest.mark.parametrize("tokens, ranks", [(800, 2), (800, 4), (800, 8), (804, 2), (806, 2)])
def test_the_head_gives_every_split_the_rows_of_one_gpu(tokens, ranks):
    x = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(3))
    one_head, one_fixes = _Head(), compat.CompatFixes()
    compat.dit_head_in_split_invariant_chunks(one_fixes, types.SimpleNamespace(head=one_head), 1)
    one_gpu = one_head.apply(x)
    split = []
    for part in x.chunk(ranks):
        head = _Head()
        compat.dit_head_in_split_invariant_chunks(compat.CompatFixes(), types.SimpleNamespace(head=head), ranks)
        split.append(head.apply(part))
    assert torch.equal(torch.cat(split), one_gpu)
    with one_fixes.disabled("dit_head_in_split_invariant_chunks"):
        assert one_head.apply(x).shape == one_gpu.shape and one_head.calls[-1] == tokens  # upstream: one call
        if ranks > 1:
            assert not torch.equal(torch.cat([_Head().apply(p) for p in x.chunk(ranks)]), one_head.apply(x))


def test_the_head_fix_needs_a_head():
    fixes = compat.CompatFixes()
    compat.dit_head_in_split_invariant_chunks(fixes, types.SimpleNamespace(), 2)
    assert fixes.names == []


@pytest.mark.parametrize("named", ["", "seq_cross_attention_in_one_gpu_blocks", "dit_head_in_split_invariant_chunks",
                                   "sage_keys_smoothed_by_head_groups, dit_head_in_split_invariant_chunks"])
def test_the_split_invariant_changes_stay_off_until_named(monkeypatch, named):
    # Unproven on a GPU, and two of them would move one GPU's bits off LightX2V's: off by default.
    monkeypatch.setenv("WAN_STUDIO_OPT_IN", named)
    names = {part.strip() for part in named.split(",")}
    fixes = compat.CompatFixes()
    assert {name: fixes.wanted(name) for name in compat.SPLIT_INVARIANT_NAMES} == {
        name: name in names for name in compat.SPLIT_INVARIANT_NAMES}
    # ...and the gate holds where the change is made: the head fix on a real head.
    compat.dit_head_in_split_invariant_chunks(fixes, types.SimpleNamespace(head=_Head()), 1)
    assert ("dit_head_in_split_invariant_chunks" in fixes.names) == ("dit_head_in_split_invariant_chunks" in names)

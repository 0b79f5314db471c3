"""What makes a clip split over N GPUs the clip of one GPU (issue 14), kernel by kernel on ONE GPU:
each test computes one GPU's op and a 2-way split of it (heads for the self-attention, tokens for the
cross-attention and the head) in the same process and compares the bits. Each also reports whether
upstream's way differs, so that a fix nobody needs shows up as such.

At 720x1280x81 (75,600 tokens, 37,800 a rank on 2 GPUs, 40 heads of 128)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("opt_in_changes_on")]
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from pipeline.backends import kernels  # noqa: E402
from pipeline.backends import lightx2v_compat as compat  # noqa: E402

TOKENS, HEADS, HEAD_DIM, CONTEXT = 75600, 40, 128, 512


def _randn(*shape, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def _sage_fn():
    pytest.importorskip("sageattention")
    import sageattention

    entry = kernels.sage_entry_point(torch.cuda.get_device_capability(0), dir(sageattention))
    if entry is None:
        pytest.skip("SageAttention does not run on this GPU")
    return getattr(sageattention, entry)


def test_key_mean_in_head_groups_gives_a_head_shard_the_bits_of_all_heads(gpu_report):
    k = _randn(TOKENS, HEADS, HEAD_DIM)
    shard = k[:, HEADS // 2:].contiguous()
    upstream_differs = not torch.equal(k.mean(dim=0)[HEADS // 2:], shard.mean(dim=0))
    group = kernels.split_invariant_head_group(HEADS)
    whole = kernels.keys_smoothed_by_head_groups(k.clone(), group)
    split = kernels.keys_smoothed_by_head_groups(shard.clone(), group)
    gpu_report("split_invariant_key_mean", upstream_mean_differs=upstream_differs, group=group)
    assert torch.equal(whole[:, HEADS // 2:], split)


def test_selector_sage_on_a_head_shard_gives_the_bits_of_all_heads(gpu_report):
    sage_fn = _sage_fn()

    def selector_sage(fixed):
        selector = kernels.AttentionSelector(torch=torch, fns=kernels.attention_functions(torch, sage_fn),
                                             offered=[kernels.SAGE], baseline=kernels.SAGE, gpu_name="gpu",
                                             versions="test", force=kernels.SAGE)
        if fixed:
            compat.sage_keys_smoothed_by_head_groups(compat.CompatFixes(), selector, HEADS)
        return selector

    q, k, v = (_randn(TOKENS, HEADS, HEAD_DIM, seed=i) for i in range(3))
    half = slice(HEADS // 2, HEADS)
    results = {}
    for fixed in (False, True):
        sel = selector_sage(fixed)
        whole = sel(q, k.clone(), v).view(TOKENS, HEADS, HEAD_DIM)[:, half]
        split = sel(q[:, half].contiguous(), k[:, half].contiguous(), v[:, half].contiguous()).view(TOKENS, -1, HEAD_DIM)
        results[fixed] = torch.equal(whole, split)
        del whole, split
    gpu_report("split_invariant_self_attention_sage", upstream_identical=results[False], fixed_identical=results[True])
    assert results[True]


def test_cross_attention_in_one_gpus_query_blocks_gives_each_rank_one_gpus_rows(gpu_report, monkeypatch):
    pytest.importorskip("lightx2v")
    sage_fn = _sage_fn()
    import lightx2v.common.ops.attn.sage_attn as sage_attn_module

    monkeypatch.setattr(sage_attn_module, "sageattn", sage_fn)
    monkeypatch.setattr(sage_attn_module, "magi_register_custom_op", None)
    module = sage_attn_module.SageAttn2Weight()
    q = _randn(TOKENS, HEADS, HEAD_DIM, seed=1)
    k, v = _randn(CONTEXT, HEADS, HEAD_DIM, seed=2), _randn(CONTEXT, HEADS, HEAD_DIM, seed=3)
    one_gpu = module.apply(q, k.clone(), v, max_seqlen_q=TOKENS, max_seqlen_kv=CONTEXT)
    slices = list(q.chunk(2))
    edge = compat.SAGE_QUERY_ROWS - 1
    neighbours = torch.stack([torch.cat((s.reshape(s.shape[0], -1)[:edge], s.reshape(s.shape[0], -1)[-edge:]))
                              for s in slices])

    def attend(block_q, block_k, block_v):
        return module.apply(block_q, block_k, block_v, max_seqlen_q=block_q.shape[0], max_seqlen_kv=block_k.shape[0])

    upstream = torch.cat([attend(s, k.clone(), v) for s in slices])
    fixed = torch.cat([compat.attention_in_global_query_blocks(attend, s, k.clone(), v, rank=r, ranks=2,
                                                               rows=compat.SAGE_QUERY_ROWS, neighbours=neighbours)
                       for r, s in enumerate(slices)])
    rel = float((upstream.float() - one_gpu.float()).norm() / one_gpu.float().norm())
    gpu_report("split_invariant_cross_attention_sage", upstream_identical=bool(torch.equal(upstream, one_gpu)),
               upstream_rel_l2=rel, fixed_identical=bool(torch.equal(fixed, one_gpu)))
    assert torch.equal(fixed, one_gpu)


def test_head_in_split_invariant_chunks_gives_each_rank_one_gpus_rows(gpu_report):
    x, w, b = _randn(TOKENS, 5120, seed=4), _randn(5120, 64, seed=5) * 0.02, _randn(64, seed=6)

    class Head:
        def apply(self, rows):
            return torch.addmm(b, rows, w)  # LightX2V's MMWeight ("Default") for the DiT head

    def head(ranks):
        h = Head()
        compat.dit_head_in_split_invariant_chunks(compat.CompatFixes(), type("W", (), {"head": h})(), ranks)
        return h

    one_gpu, upstream_one = head(1).apply(x), Head().apply(x)
    split = torch.cat([head(2).apply(part) for part in x.chunk(2)])
    upstream_split = torch.cat([Head().apply(part) for part in x.chunk(2)])
    gpu_report("split_invariant_head", upstream_identical=bool(torch.equal(upstream_split, upstream_one)),
               chunked_equals_upstream_one_gpu=bool(torch.equal(one_gpu, upstream_one)),
               fixed_identical=bool(torch.equal(split, one_gpu)))
    assert torch.equal(split, one_gpu)

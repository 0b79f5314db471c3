"""Kernel choices on CPU: which attention backends a GPU is offered (faked compute capabilities),
the choice rule and the per-GPU cache (fake timings, real errors computed with CPU torch), the INT8
GEMM shared-memory arithmetic, and the compat hooks on fakes shaped like LightX2V's objects."""

from __future__ import annotations

import types
from dataclasses import replace

import pytest

from pipeline.backends import kernels
from pipeline.backends import lightx2v_compat as compat
from pipeline.store.history import History

SAGE_106 = ["sageattn", "sageattn_varlen"]  # what sageattention 1.0.6 exports
SAGE_2 = SAGE_106 + [kernels.SAGE_SM89_ENTRY]


# -- capability logic ---------------------------------------------------------------------------


@pytest.mark.parametrize("capability, exports, expected", [
    ((8, 6), SAGE_106, "sageattn"),                 # RTX 30: LightX2V's own pick exists
    ((8, 9), SAGE_106, "sageattn"),                 # RTX 40 with 1.0.6: LightX2V's import would fail
    ((12, 0), SAGE_106, "sageattn"),                # RTX 50 with 1.0.6
    ((8, 9), SAGE_2, kernels.SAGE_SM89_ENTRY),      # RTX 40 with a SageAttention that has it
    ((9, 0), SAGE_2, "sageattn"),
    ((7, 5), SAGE_106, None),                       # Turing: SageAttention's Triton kernel needs sm_80
    ((8, 6), [], None),                             # not installed
    (None, SAGE_106, None),                         # no GPU
])
def test_sage_entry_point_per_compute_capability(capability, exports, expected):
    assert kernels.sage_entry_point(capability, exports) == expected


def test_attention_offered_per_compute_capability():
    assert kernels.available_attention((8, 6), sage_exports=SAGE_106) == [
        kernels.SAGE, kernels.SDPA_CUDNN, kernels.SDPA_FLASH, kernels.SDPA_EFFICIENT]
    # RTX 40 with SageAttention 1.0.6: still offered (the compat fix makes LightX2V use sageattn).
    assert kernels.available_attention((8, 9), sage_exports=SAGE_106)[0] == kernels.SAGE
    # Turing: no bf16 flash/cuDNN kernels, no SageAttention; LightX2V's torch_sdpa is the baseline.
    assert kernels.available_attention((7, 5), sage_exports=SAGE_106) == [kernels.TORCH_SDPA, kernels.SDPA_EFFICIENT]
    # FlashAttention 3 only on Hopper, flash_attn only where installed, cuDNN only where enabled.
    assert kernels.FLASH_ATTN3 not in kernels.available_attention((8, 6), flash_attn3=True)
    assert kernels.FLASH_ATTN3 in kernels.available_attention((9, 0), flash_attn3=True)
    assert kernels.FLASH_ATTN2 not in kernels.available_attention((8, 6))
    assert kernels.SDPA_CUDNN not in kernels.available_attention((9, 0), cudnn_sdpa=False)
    assert kernels.available_attention((8, 6))[0] == kernels.TORCH_SDPA  # no SageAttention installed
    assert kernels.available_attention(None) == []


# -- the choice rule ------------------------------------------------------------------------------

T = kernels.Trial


def test_fastest_backend_no_less_accurate_than_the_baseline_wins():
    trials = [T("sage_attn2", 0.050, 0.0134), T("sdpa_cudnn", 0.039, 0.0029), T("sdpa_flash", 0.061, 0.0029)]
    assert kernels.choose_attention(trials, "sage_attn2") == "sdpa_cudnn"


def test_a_faster_but_less_accurate_backend_is_not_chosen():
    trials = [T("sage_attn2", 0.050, 0.0134), T("sdpa_cudnn", 0.039, 0.0200), T("sdpa_flash", 0.045, 0.0134)]
    # equal error qualifies ("no worse than"), more error does not
    assert kernels.choose_attention(trials, "sage_attn2") == "sdpa_flash"


def test_the_baseline_stands_on_ties_failures_and_slower_rivals():
    assert kernels.choose_attention([T("sage_attn2", 0.05, 0.01), T("sdpa_cudnn", 0.05, 0.001)], "sage_attn2") == "sage_attn2"
    assert kernels.choose_attention([T("sage_attn2", 0.05, 0.01), T("sdpa_cudnn", error="RuntimeError: no kernel")],
                                    "sage_attn2") == "sage_attn2"
    assert kernels.choose_attention([T("sage_attn2", 0.05, 0.01), T("sdpa_efficient", 0.12, 0.001)], "sage_attn2") == "sage_attn2"


def test_without_a_measured_baseline_the_most_accurate_sets_the_bar():
    trials = [T("sage_attn2", error="TypeError: 'NoneType' object is not callable"),
              T("sdpa_cudnn", 0.04, 0.003), T("sdpa_efficient", 0.12, 0.003), T("sdpa_flash", 0.03, 0.009)]
    assert kernels.choose_attention(trials, "sage_attn2") == "sdpa_cudnn"
    assert kernels.choose_attention([T("sage_attn2", error="x")], "sage_attn2") == "sage_attn2"


# -- the selector: real error measurement on CPU, fake timings, cached per GPU --------------------


def _cpu_backends(torch, calls):
    """Attention on CPU: an exact one, one with INT8-like error and one that cannot run here."""

    def exact(q, k, v):
        calls.append("exact")
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    def noisy(q, k, v):
        calls.append("noisy")
        out = exact(q, k, v)
        return out + 0.02 * out.abs().mean() * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))

    def broken(q, k, v):
        raise RuntimeError("No available kernel")

    return {"sage_attn2": noisy, "sdpa_cudnn": exact, "sdpa_flash": broken}


def _selector(torch, store, timings, calls, force=None):
    return kernels.AttentionSelector(torch=torch, fns=_cpu_backends(torch, calls),
                                     offered=["sage_attn2", "sdpa_cudnn", "sdpa_flash"], baseline="sage_attn2",
                                     gpu_name="Fake GPU", versions="torch-test", store=store, force=force,
                                     clock=lambda name, call: (call(), timings[name])[1])


def test_selector_measures_once_per_gpu_and_shape_and_caches_in_the_history(tmp_path):
    torch = pytest.importorskip("torch")
    history = History(tmp_path / "history.sqlite3")
    q, k, v = (torch.randn(300, 4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    calls: list[str] = []
    sel = _selector(torch, history, {"sage_attn2": 0.05, "sdpa_cudnn": 0.04}, calls)
    out = sel(q, k, v)
    assert out.shape == (300, 64)
    choice = sel.choices[next(iter(sel.choices))]
    assert choice.backend == "sdpa_cudnn" and choice.source == "measured"
    errors = {t.backend: t for t in choice.trials}
    assert errors["sdpa_cudnn"].rel_l2 < 1e-5 < errors["sage_attn2"].rel_l2  # measured, not assumed
    assert errors["sdpa_flash"].error.startswith("RuntimeError")
    # A new process (new selector) on the same GPU reads the choice back and measures nothing.
    calls2: list[str] = []
    again = _selector(torch, history, {"sage_attn2": 9.0, "sdpa_cudnn": 9.0}, calls2)
    again(q, k, v)
    assert list(again.choices.values())[0].source == "cached" and calls2 == ["exact"]
    # The System tab's view of it.
    shown = kernels.cached_choices(history, "Fake GPU")
    assert shown[0]["backend"] == "sdpa_cudnn" and shown[0]["shape"] == "300x4x16"
    assert kernels.cached_choices(history, "Other GPU") == []
    # Another shape is measured on its own.
    calls.clear()
    sel(q[:200].contiguous(), k[:200].contiguous(), v[:200].contiguous())
    assert len(sel.choices) == 2 and "noisy" in calls
    history.close()


def test_selector_keeps_the_baseline_when_the_rival_is_slower_and_obeys_force():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(64, 2, 8) for _ in range(3))
    calls: list[str] = []
    sel = _selector(torch, kernels.MemoryStore(), {"sage_attn2": 0.03, "sdpa_cudnn": 0.04}, calls)
    sel(q, k, v)
    assert list(sel.choices.values())[0].backend == "sage_attn2"
    forced = _selector(torch, None, {}, [], force="sdpa_cudnn")
    forced(q, k, v)
    assert list(forced.choices.values())[0].source == "forced"


def test_a_cached_choice_this_process_cannot_run_is_measured_again():
    torch = pytest.importorskip("torch")
    store = kernels.MemoryStore()
    q, k, v = (torch.randn(64, 2, 8) for _ in range(3))
    key = kernels.attention_key(64, 2, 8, "float32", "torch-test")
    store.record_kernel_choice("Fake GPU", key, kernels.AttentionChoice("flash_attn3", "sage_attn2", "64x2x8",
                                                                        "Fake GPU").to_json())
    sel = _selector(torch, store, {"sage_attn2": 0.05, "sdpa_cudnn": 0.04}, [])
    sel(q, k, v)
    assert list(sel.choices.values())[0].source == "measured"


def test_a_kernel_installed_after_the_choice_was_stored_is_measured_then():
    torch = pytest.importorskip("torch")
    store = kernels.MemoryStore()
    q, k, v = (torch.randn(64, 2, 8) for _ in range(3))
    timings = {"sage_attn2": 0.05, "sdpa_cudnn": 0.04, "sdpa_flash": 0.03}
    before = _selector(torch, store, timings, [])
    before.offered = ["sage_attn2", "sdpa_cudnn"]  # sdpa_flash not installed yet
    before(q, k, v)
    assert list(before.choices.values())[0].backend == "sdpa_cudnn"
    installed = _selector(torch, store, timings, [])
    installed.fns["sdpa_flash"] = installed.fns["sdpa_cudnn"]  # now it runs, and faster
    installed(q, k, v)
    choice = list(installed.choices.values())[0]
    assert choice.source == "measured" and choice.backend == "sdpa_flash"
    later = _selector(torch, store, timings, [])
    later.fns["sdpa_flash"] = later.fns["sdpa_cudnn"]
    later(q, k, v)
    assert list(later.choices.values())[0].source == "cached"


# -- a sequence-parallel group runs one kernel ----------------------------------------------------


class _Peers:
    """A RankGroup as rank `rank` of two sees it: rank 0's broadcast is whatever `from_rank0` holds."""

    def __init__(self, rank, from_rank0=None, others_offer=None):
        self.sent: list = []
        self.group = kernels.RankGroup(rank, 2, broadcast=self._broadcast,
                                       all_gather=lambda offered: [offered, others_offer or offered])
        self.from_rank0 = from_rank0

    def _broadcast(self, obj):
        self.sent.append(obj)
        return obj if self.group.rank == 0 else self.from_rank0


def test_rank_0_chooses_the_kernel_and_every_rank_runs_it():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(96, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    rank0 = _Peers(0)
    sel0 = _selector(torch, kernels.MemoryStore(), {"sage_attn2": 0.05, "sdpa_cudnn": 0.04}, [])
    sel0.ranks = rank0.group
    sel0(q, k, v)
    mine = sel0.choices[next(iter(sel0.choices))]
    assert mine.backend == "sdpa_cudnn" and mine.source == "measured" and mine.ranks == 2
    assert kernels.AttentionChoice.from_json(rank0.sent[0]).backend == "sdpa_cudnn"
    # Rank 1 would measure sage_attn2 faster on its own head shard: it measures nothing and runs rank 0's.
    calls: list[str] = []
    rank1 = _Peers(1, from_rank0=rank0.sent[0])
    sel1 = _selector(torch, None, {"sage_attn2": 0.01, "sdpa_cudnn": 0.04}, calls)
    sel1.ranks = rank1.group
    out = sel1(q, k, v)
    theirs = sel1.choices[next(iter(sel1.choices))]
    assert (theirs.backend, theirs.source, theirs.ranks) == ("sdpa_cudnn", "measured on rank 0", 2)
    assert calls == ["exact"] and rank1.sent == [None] and out.shape == (96, 16)
    # The record says so.
    assert theirs.summary()["ranks"] == 2 and "ranks" not in kernels.AttentionChoice("a", "a", "s", "g").summary()
    # The next call of the shape asks nobody.
    sel1(q, k, v)
    assert rank1.sent == [None]


def test_a_failed_choice_on_rank_0_reaches_every_rank_instead_of_a_hang():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(64, 2, 8) for _ in range(3))
    class Broken:  # the history database cannot be read
        def kernel_choice(self, gpu_name, key):
            raise RuntimeError("database disk image is malformed")

    rank0 = _Peers(0)
    sel0 = _selector(torch, Broken(), {"sage_attn2": 0.01, "sdpa_cudnn": 0.04}, [])
    sel0.ranks = rank0.group
    with pytest.raises(RuntimeError, match="malformed"):
        sel0(q, k, v)
    assert rank0.sent == [None]  # told the others before raising
    sel1 = _selector(torch, None, {"sage_attn2": 0.01, "sdpa_cudnn": 0.04}, [])
    sel1.ranks = _Peers(1, from_rank0=None).group
    with pytest.raises(RuntimeError, match="rank 0"):
        sel1(q, k, v)


def test_a_group_is_offered_only_the_kernels_every_rank_can_run():
    real = pytest.importorskip("torch")
    torch = _fake_torch((8, 9), "NVIDIA GeForce RTX 4090")
    alone = kernels.build_selector(torch, lambda *a, **k: None, SAGE_106)
    assert kernels.SDPA_CUDNN in alone.offered
    elsewhere = [n for n in alone.offered if n != kernels.SDPA_CUDNN]  # a peer whose PyTorch has no cuDNN SDPA
    asked: list = []
    peers = _Peers(0, others_offer=elsewhere)
    gather = peers.group.all_gather
    peers.group = replace(peers.group, all_gather=lambda offered: (asked.append(offered), gather(offered))[1])
    grouped = kernels.build_selector(torch, lambda *a, **k: None, SAGE_106, ranks=peers.group)
    # Building asks no other rank (a rank whose load failed earlier is not there to answer).
    assert asked == [] and grouped.offered == alone.offered
    # The first call does, once, and rank 0 chooses among what every rank runs.
    exact = _cpu_backends(real, [])["sdpa_cudnn"]
    grouped.torch, grouped.fns = real, {name: exact for name in alone.offered}
    grouped.clock = lambda name, call: (call(), {"sdpa_cudnn": 0.01}.get(name, 0.05))[1]
    q, k, v = (real.randn(64, 2, 8, generator=real.Generator().manual_seed(i)) for i in range(3))
    grouped(q, k, v)
    assert len(asked) == 1 and grouped.offered == elsewhere and grouped.baseline == alone.baseline == kernels.SAGE
    assert grouped.choices[next(iter(grouped.choices))].backend != kernels.SDPA_CUDNN
    grouped(q[:32], k[:32], v[:32])  # another shape: asked once only
    assert len(asked) == 1


# -- INT8 GEMM shared memory ----------------------------------------------------------------------


def test_int8_gemm_shared_memory_per_tile():
    # LightX2V's four tiles: two exceed an sm_86 SM (99 KB), two fit.
    assert kernels.int8_gemm_smem_bytes(256, 128, 128, 3) == 147456
    assert kernels.int8_gemm_smem_bytes(128, 128, 128, 4) == 131072
    assert kernels.int8_gemm_smem_bytes(256, 128, 64, 3) == 73728
    assert kernels.int8_gemm_smem_bytes(256, 128, 64, 4) == 98304
    assert kernels.int8_gemm_smem_bytes(128, 128, 64, 4, elem_bytes=2) == 131072  # bf16 tiles double it
    upstream = kernels.INT8_GEMM_TILES[:4]
    assert len(kernels.int8_gemm_tiles_for(kernels.SM86_SMEM_PER_BLOCK, upstream)) == 2
    assert kernels.int8_gemm_tiles_for(kernels.SM86_SMEM_PER_BLOCK) == list(kernels.INT8_GEMM_INSTALLED)
    assert kernels.int8_gemm_tiles_for(227 * 1024, upstream) == list(upstream)  # sm_90 fits all four
    assert kernels.int8_gemm_tiles_for(64 * 1024) == [(128, 128, 64, 4, 4)]


class _FakeConfig:
    def __init__(self, kwargs, num_stages, num_warps):
        self.kwargs, self.num_stages, self.num_warps = kwargs, num_stages, num_warps


class _FakeAutotuner:
    def __init__(self, configs):
        self.configs, self.cache = configs, {("M", "N", "K"): configs[0]}


def test_compat_installs_the_tiles_and_a_skipping_build_gets_upstream_back():
    upstream = [_FakeConfig({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": 1}, s, w)
                for m, n, k, s, w in kernels.INT8_GEMM_TILES[:4]]
    module = types.SimpleNamespace(Config=_FakeConfig, int8_gemm_bias_kernel=_FakeAutotuner(list(upstream)),
                                   int8_gemm_kernel=_FakeAutotuner(list(upstream)))
    fixes = compat.CompatFixes()
    compat.int8_gemm_tiles_for_this_gpu(fixes, module, kernels.SM86_SMEM_PER_BLOCK)
    assert fixes.has("int8_gemm_tiles_for_this_gpu")
    for kern in (module.int8_gemm_bias_kernel, module.int8_gemm_kernel):
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
                for c in kern.configs] == list(kernels.INT8_GEMM_INSTALLED)
        assert kern.cache == {}
        assert all(kernels.int8_gemm_smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                c.num_stages) <= kernels.SM86_SMEM_PER_BLOCK for c in kern.configs)
    skipping = compat.CompatFixes(skip=frozenset({"int8_gemm_tiles_for_this_gpu"}))
    compat.int8_gemm_tiles_for_this_gpu(skipping, module, kernels.SM86_SMEM_PER_BLOCK)
    assert module.int8_gemm_bias_kernel.configs == upstream and not skipping.has("int8_gemm_tiles_for_this_gpu")


# -- compat: SageAttention on RTX 40/50 -----------------------------------------------------------


def _sage_module(sageattn=None):
    return types.SimpleNamespace(sageattn=sageattn, magi_register_custom_op=None)


def test_rtx_40_and_50_get_sageattention_106s_kernel():
    sageattention = types.SimpleNamespace(sageattn=lambda *a, **k: "1.0.6")
    for capability in ((8, 9), (12, 0)):
        module, fixes = _sage_module(), compat.CompatFixes()
        compat.sage_attention_on_sm89_sm120(fixes, module, sageattention, capability)
        assert module.sageattn is sageattention.sageattn and fixes.has("sage_attention_on_sm89_sm120")
        with fixes.disabled("sage_attention_on_sm89_sm120"):
            assert module.sageattn is None  # upstream's state: the first step would fail
        assert module.sageattn is sageattention.sageattn
    compat._PROCESS_WIDE.discard("sage_attention_on_sm89_sm120")


def test_sage_fix_does_nothing_where_lightx2v_found_its_kernel_or_none_exists():
    own = lambda *a, **k: "own"  # noqa: E731
    module, fixes = _sage_module(own), compat.CompatFixes()
    compat.sage_attention_on_sm89_sm120(fixes, module, types.SimpleNamespace(sageattn=lambda: 0), (8, 6))
    assert module.sageattn is own and fixes.names == []
    module, fixes = _sage_module(), compat.CompatFixes()
    compat.sage_attention_on_sm89_sm120(fixes, module, types.SimpleNamespace(), (8, 9))  # nothing to use
    assert module.sageattn is None and fixes.names == []
    compat.sage_attention_on_sm89_sm120(fixes, module, None, (8, 9))  # sageattention not installed
    assert fixes.names == []


# -- compat: the attention swap on LightX2V-shaped modules ----------------------------------------


class _Module:
    def __init__(self, **modules):
        self._modules = dict(modules)


class SageAttn2Weight(_Module):
    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        return ("lightx2v", q.shape)


class _Selector:
    baseline, offered, force = "sage_attn2", ["sage_attn2", "sdpa_cudnn"], None

    def __call__(self, q, k, v):
        return ("selector", q.shape)


def test_attention_swap_routes_dense_self_attention_and_can_be_undone():
    torch = pytest.importorskip("torch")
    shared = SageAttn2Weight()
    blocks = [_Module(compute_phases=_Module(p0=_Module(self_attn_1=SageAttn2Weight(), cross_attn_1=SageAttn2Weight())))
              for _ in range(3)]
    weights = _Module(blocks=_Module(**{str(i): b for i, b in enumerate(blocks)}),
                      buffers=_Module(a=_Module(self_attn_1=shared), b=_Module(self_attn_1=shared)))
    found = compat.attention_modules(weights)
    assert len(found) == 4  # three blocks + one shared buffer module, once
    fixes = compat.CompatFixes()
    compat.attention_chosen_by_measurement(fixes, weights, _Selector())
    q = torch.zeros(10, 4, 8)
    assert found[0].apply(q=q, k=q, v=q, cu_seqlens_q=None, max_seqlen_q=10, block_idx=0)[0] == "selector"
    assert found[0].apply(q[None], q[None], q[None])[0] == "lightx2v"          # batched: upstream's
    assert found[0].apply(q, q[:5], q[:5])[0] == "lightx2v"                    # cross-length: upstream's
    cross = blocks[0]._modules["compute_phases"]._modules["p0"]._modules["cross_attn_1"]
    assert cross.apply(q, q, q)[0] == "lightx2v"                               # cross-attention untouched
    with fixes.disabled("attention_chosen_by_measurement"):
        assert found[0].apply(q, q, q)[0] == "lightx2v"
    assert found[0].apply(q, q, q)[0] == "selector"


def test_attention_swap_skipped_for_sparse_attention_and_by_switch():
    class SvgAttnWeight(_Module):
        def apply(self, q, k, v, **kwargs):
            return "svg"

    fixes = compat.CompatFixes()
    compat.attention_chosen_by_measurement(fixes, _Module(b=_Module(self_attn_1=SvgAttnWeight())), _Selector())
    assert fixes.names == []
    skip = compat.CompatFixes(skip=frozenset({"attention_chosen_by_measurement"}))
    module = SageAttn2Weight()
    compat.attention_chosen_by_measurement(skip, _Module(b=_Module(self_attn_1=module)), _Selector())
    assert "apply" not in module.__dict__ and skip.names == []


def test_a_backend_that_runs_out_of_memory_is_not_chosen_and_the_run_goes_on():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(64, 2, 8) for _ in range(3))
    calls: list[str] = []
    sel = _selector(torch, None, {"sage_attn2": 0.05, "sdpa_cudnn": 0.01}, calls)

    def hungry(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    sel.fns["sdpa_cudnn"] = hungry
    out = sel(q, k, v)
    choice = list(sel.choices.values())[0]
    assert choice.backend == "sage_attn2" and out.shape == (64, 16)
    assert "OutOfMemoryError" in {t.backend: t for t in choice.trials}["sdpa_cudnn"].error


def _fake_torch(capability, name):
    return types.SimpleNamespace(
        __version__="2.11.0",
        cuda=types.SimpleNamespace(get_device_capability=lambda i=0: capability, get_device_name=lambda i=0: name,
                                   get_device_properties=lambda i=0: types.SimpleNamespace(
                                       shared_memory_per_block_optin=101376 if capability != (9, 0) else 232448)),
        backends=types.SimpleNamespace(cuda=types.SimpleNamespace(cudnn_sdp_enabled=lambda: True)))


@pytest.mark.parametrize("capability, name", [((8, 9), "NVIDIA GeForce RTX 4090"), ((12, 0), "NVIDIA GeForce RTX 5090"),
                                              ((8, 6), "NVIDIA GeForce RTX 3060")])
def test_install_on_a_faked_gpu_offers_sageattention_that_runs_there(capability, name):
    pytest.importorskip("torch")
    upstream = [_FakeConfig({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": 1}, s, w)
                for m, n, k, s, w in kernels.INT8_GEMM_TILES[:4]]
    triton_kernels = types.SimpleNamespace(Config=_FakeConfig, int8_gemm_bias_kernel=_FakeAutotuner(list(upstream)))
    sage_106 = types.SimpleNamespace(sageattn=lambda *a, **k: "1.0.6", sageattn_varlen=None)
    # LightX2V's import on 8.9/12.0 asked 1.0.6 for a function it lacks: its module holds None there.
    lightx2v_sage = _sage_module(None if capability in kernels.SAGE_SM89_CAPABILITIES else sage_106.sageattn)
    attn = SageAttn2Weight()
    weights = _Module(blocks=_Module(b0=_Module(self_attn_1=attn)))
    fixes = compat.CompatFixes()
    selector = kernels.install(compat, fixes, _fake_torch(capability, name),
                               {"quant_scheme": "int8-triton", "attn_mode": "sage_attn2"}, weights,
                               sage_attn_module=lightx2v_sage, sageattention=sage_106, triton_kernels=triton_kernels)
    compat._PROCESS_WIDE.discard("sage_attention_on_sm89_sm120")
    compat._PROCESS_WIDE.discard("int8_gemm_tiles_for_this_gpu")
    assert lightx2v_sage.sageattn is sage_106.sageattn  # sage_attn2's first step can run
    assert fixes.has("sage_attention_on_sm89_sm120") == (capability in kernels.SAGE_SM89_CAPABILITIES)
    assert selector is not None and selector.baseline == kernels.SAGE and selector.offered[0] == kernels.SAGE
    assert selector.gpu_name == name and "apply" in attn.__dict__
    assert len(triton_kernels.int8_gemm_bias_kernel.configs) == len(kernels.INT8_GEMM_INSTALLED)


def test_install_never_offers_sageattention_where_it_is_missing():
    pytest.importorskip("torch")
    fixes = compat.CompatFixes()
    selector = kernels.install(compat, fixes, _fake_torch((8, 9), "NVIDIA GeForce RTX 4060"),
                               {"quant_scheme": "int8-triton", "attn_mode": "torch_sdpa"},
                               _Module(b=_Module(self_attn_1=SageAttn2Weight())), sage_attn_module=_sage_module(None),
                               sageattention=None, triton_kernels=None)
    assert kernels.SAGE not in selector.offered and selector.baseline == kernels.TORCH_SDPA
    assert fixes.names == ["attention_chosen_by_measurement"]
    with pytest.raises(ValueError, match="cannot run on this GPU"):
        kernels.install(compat, compat.CompatFixes(), _fake_torch((8, 9), "x"),
                        {"quant_scheme": "int8-triton", "attn_mode": "torch_sdpa"}, _Module(), sage_attn_module=None,
                        sageattention=None, triton_kernels=None, attention=kernels.SAGE)


def test_a_kernel_whose_two_calls_differ_is_never_chosen():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(128, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    exact = kernels.attention_functions(torch, None)["torch_sdpa"]
    jitter = {"n": 0}

    def flaky(q, k, v):  # fast and accurate, but an order-dependent reduction: not bit-repeatable
        jitter["n"] += 1
        return exact(q, k, v) + jitter["n"] * 1e-7

    trials = kernels.measure_attention(torch, q, k, v, {"sage_attn2": exact, "flaky": flaky},
                                       ["sage_attn2", "flaky"],
                                       clock=lambda name, call: 0.01 if name == "flaky" else 0.05)
    by_name = {t.backend: t for t in trials}
    assert by_name["flaky"].error.startswith("not repeatable") and by_name["flaky"].seconds is None
    assert by_name["sage_attn2"].error is None
    assert kernels.choose_attention(trials, "sage_attn2") == "sage_attn2"


def test_a_choice_not_repeatable_on_the_whole_call_falls_back_to_the_baseline_and_is_not_stored(tmp_path):
    torch = pytest.importorskip("torch")
    history = History(tmp_path / "history.sqlite3")
    q, k, v = (torch.randn(300, 4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    calls: list[str] = []
    sel = _selector(torch, history, {"sage_attn2": 0.05, "sdpa_cudnn": 0.01}, calls)
    exact = sel.fns["sdpa_cudnn"]
    jitter = {"n": 0}

    def cudnn_like(qq, kk, vv):  # repeatable on the measured prefix view, not on the whole tensor
        jitter["n"] += 1
        return exact(qq, kk, vv) + (jitter["n"] * 1e-6 if qq is q else 0.0)

    sel.fns["sdpa_cudnn"] = cudnn_like
    sel(q, k, v)
    choice = list(sel.choices.values())[0]
    assert choice.backend == "sage_attn2"
    assert {t.backend: t for t in choice.trials}["sdpa_cudnn"].error == "not repeatable on the whole call"
    # The fallback is remembered like any measured choice.
    assert kernels.cached_choices(history, "Fake GPU")[0]["backend"] == "sage_attn2"
    history.close()


def test_a_choice_made_while_a_backend_ran_out_of_memory_is_not_stored():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(64, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    store = kernels.MemoryStore()
    sel = _selector(torch, store, {"sage_attn2": 0.05, "sdpa_cudnn": 0.04}, [])

    def oom(qq, kk, vv):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    sel.fns["sdpa_flash"] = oom
    sel(q, k, v)
    assert list(sel.choices.values())[0].backend == "sdpa_cudnn"
    assert store.kernel_choice("Fake GPU", next(iter(sel.choices))) is None


def _smoothing_sage(torch):
    """Like SageAttention 1.0.6 (smooth_k): subtracts the keys' mean from k in place, then attends."""
    exact = kernels.attention_functions(torch, None)["torch_sdpa"]

    def sage(q, k, v):
        k -= k.mean(dim=0, keepdim=True)
        return exact(q, k, v)
    return sage


def test_measuring_a_backend_that_changes_k_in_place_leaves_k_as_it_was():
    # Measured on an H200: the first run of each shape gave other frames than the next ones, because
    # measuring SageAttention smoothed the block's k in place before the real call; and SageAttention
    # was judged "not repeatable" (its second call saw the smoothed k).
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(256, 2, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i) )
               for i in range(3))
    k += 3.0  # a mean to subtract, as real keys have
    k_before = k.clone()
    fns = {"sage_attn2": _smoothing_sage(torch), "sdpa_cudnn": kernels.attention_functions(torch, None)["torch_sdpa"]}
    trials = kernels.measure_attention(torch, q, k, v, fns, ["sage_attn2", "sdpa_cudnn"], query_rows=64,
                                       clock=lambda name, call: (call(), 0.01)[1])
    assert torch.equal(k, k_before)
    assert {t.backend: t.error for t in trials} == {"sage_attn2": None, "sdpa_cudnn": None}


def test_the_first_call_of_a_shape_gives_what_the_next_calls_give():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.randn(300, 2, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    k += 3.0
    sel = kernels.AttentionSelector(torch=torch, fns={"sage_attn2": _smoothing_sage(torch),
                                                      "sdpa_cudnn": kernels.attention_functions(torch, None)["torch_sdpa"]},
                                    offered=["sage_attn2", "sdpa_cudnn"], baseline="sage_attn2", gpu_name="Fake GPU",
                                    versions="t", clock=lambda name, call: (call(), 0.05 if name == "sage_attn2" else 0.01)[1])
    # The whole-call repeatability check runs too: the rival is faster and no less accurate.
    first = sel(q, k.clone(), v)
    again = sel(q, k.clone(), v)
    assert list(sel.choices.values())[0].backend == "sdpa_cudnn"
    assert torch.equal(first, again)


def test_without_a_baseline_errors_equal_to_the_fourth_digit_count_as_equal():
    trials = [T("sage_attn2", error="not importable"), T("sdpa_cudnn", 0.000367, 0.001703),
              T("sdpa_flash", 0.000627, 0.001702)]
    assert kernels.choose_attention(trials, "sage_attn2") == "sdpa_cudnn"


OPT_IN = "dit_head_in_split_invariant_chunks"  # a change of OPT_IN_NAMES, the example here


@pytest.mark.parametrize("named", ["", "rope_fused", "dit_head", f"rope_fused,{OPT_IN}", f"rope_fused, {OPT_IN}"])
def test_an_opt_in_change_is_applied_only_where_it_is_named(monkeypatch, named):
    monkeypatch.setenv("WAN_STUDIO_OPT_IN", named)
    fixes = compat.CompatFixes()
    assert fixes.wanted(OPT_IN) == (OPT_IN in named.replace(" ", "").split(","))
    assert fixes.wanted("rope_fused")  # proven: named or not
    assert OPT_IN in compat.OPT_IN_NAMES


@pytest.mark.parametrize("named", ["", f" {OPT_IN}"])
def test_a_change_that_left_the_opt_in_set_is_applied_without_being_named(monkeypatch, named):
    # A change taken out of OPT_IN_NAMES runs for everyone, named or not (a name with a space after
    # the comma included).
    monkeypatch.setattr(compat, "OPT_IN_NAMES", frozenset())
    monkeypatch.setenv("WAN_STUDIO_OPT_IN", named)
    assert compat.CompatFixes().wanted(OPT_IN)

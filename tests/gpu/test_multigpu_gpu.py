"""Several GPUs (issue 14) on the tiny synthetic checkpoint: one clip over two GPUs with LightX2V's
Ulysses sequence parallelism through the app's GPU workers, its frames against one GPU's, and two
lanes running two clips. Needs two CUDA devices (skipped otherwise)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.backend import RunHooks
from pipeline.types import RunSpec
from pipeline.workers.child import build_backend
from pipeline.workers.group import RemoteBackend, WorkerGroup
from pipeline.workers.protocol import BackendSpec
from tests.gpu.gpuhelpers import CAP_GIB

pytestmark = pytest.mark.gpu


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


needs_two = pytest.mark.skipif("not _two_gpus()", reason="needs two CUDA devices")

SPEC = dict(preset="480x832x49", rung="fast", prompt="two lanterns over a river", negative_prompt="", seed=11,
            height=480, width=832, frames=49, steps=4, shift=5.0, guidance=1.0,
            memory={"offload_granularity": "block", "text_encoder": "offload", "vae_tiling": True})


class _Collect:
    def __init__(self):
        self.steps, self.latents = [], None
        self.hooks = RunHooks(on_phase=lambda p: None, on_step=lambda i, n: self.steps.append(i),
                              should_stop=lambda: False, on_latents=self._keep)

    def _keep(self, latents):
        self.latents = latents


def _run(ckpt, gpus, seq, attention="sdpa_flash"):
    # One kernel forced in both runs (so the comparison is of the split, not of two measurements).
    # FlashAttention through SDPA: offered on every card the app runs on (sm_80 and newer) whatever
    # LightX2V's own kernel is; torch_sdpa is offered only where SageAttention is missing (measured on
    # 2x H200, 2026-11-30: "attention backend 'torch_sdpa' cannot run on this GPU").
    spec = BackendSpec("lightx2v", {"weights_dir": str(ckpt), "vram_cap_gib": CAP_GIB, "attention": attention,
                                    "seq_parallel": len(gpus) if seq else 1})
    group = WorkerGroup(spec, gpus, seq=seq)
    group.start()
    try:
        group.wait_ready(300)
        backend = RemoteBackend(group, build_backend(spec, 0))
        model = backend.load(backend.load_key(SPEC["memory"]), lambda p: None)
        collect = _Collect()
        frames = model.generate(RunSpec(**SPEC), collect.hooks)
        return frames, collect, group.per_gpu_peaks(), group.last_describe
    finally:
        group.close()


@needs_two
def test_seq_two_gpus_makes_the_clip_of_one_gpu(tiny_ckpt, gpu_report):
    import torch

    one, one_run, one_peaks, _ = _run(tiny_ckpt, (0,), seq=False)
    two, two_run, two_peaks, describe = _run(tiny_ckpt, (0, 1), seq=True)
    assert two.shape == one.shape == (49, 480, 832, 3) and two.dtype == np.uint8
    assert two_run.steps == [1, 2, 3, 4]
    assert "parallel_env_initialised_once" in describe["compat_fixes"]
    assert describe["seq_parallel"]["seq_p_size"] == 2
    a, b = torch.as_tensor(two_run.latents).float(), torch.as_tensor(one_run.latents).float()
    rel_l2 = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    identical = bool(np.array_equal(one, two))
    gpu_report("multigpu_seq_tiny", rel_l2_latents=rel_l2, frames_identical=identical,
               latents_identical=bool(torch.equal(a, b)), peaks_one=one_peaks, peaks_two=two_peaks)
    # The same arithmetic split over heads: bf16 all-to-all moves values without rounding, so the
    # DiT output may differ only by the attention kernel's own reduction order per head shard.
    assert rel_l2 < 1e-2, rel_l2
    assert all(p is not None for p in two_peaks)


@needs_two
@pytest.mark.usefixtures("opt_in_changes_on")
def test_seq_two_gpus_with_sage_makes_one_gpus_latents_bit_for_bit(tiny_ckpt, gpu_report):
    """LightX2V's own kernel (SageAttention) in the self- and the cross-attention of both runs: with
    lightx2v_compat.SPLIT_INVARIANT_NAMES nothing of the split reaches the arithmetic (the keys'
    mean in fixed head groups, the cross-attention in one GPU's query blocks, the head in shared
    slices), so the latents and the frames are those of one GPU, bit for bit."""
    import torch

    from pipeline.backends import lightx2v_compat as compat

    pytest.importorskip("sageattention")
    one, one_run, _, one_describe = _run(tiny_ckpt, (0,), seq=False, attention="sage_attn2")
    two, two_run, _, describe = _run(tiny_ckpt, (0, 1), seq=True, attention="sage_attn2")
    assert set(compat.SPLIT_INVARIANT_NAMES) <= set(describe["compat_fixes"]), describe["compat_fixes"]
    assert {"sage_keys_smoothed_by_head_groups", "dit_head_in_split_invariant_chunks"} <= set(one_describe["compat_fixes"])
    a, b = torch.as_tensor(two_run.latents), torch.as_tensor(one_run.latents)
    rel_l2 = float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))
    gpu_report("multigpu_seq_tiny_sage_bits", latents_identical=bool(torch.equal(a, b)), rel_l2_latents=rel_l2,
               frames_identical=bool(np.array_equal(one, two)))
    assert torch.equal(a, b), rel_l2
    assert np.array_equal(one, two)


@needs_two
def test_seq_two_gpus_auto_attention_is_rank0s_choice_and_a_rebuild_reuses_the_groups(tiny_ckpt, gpu_report):
    """--attention auto on a sequence-parallel group: the measured attention is applied, not skipped
    (rank 0 chooses, every rank runs it, the record says so); then a rebuild (another offload
    granularity) runs on the process groups of the first build."""
    spec = BackendSpec("lightx2v", {"weights_dir": str(tiny_ckpt), "vram_cap_gib": CAP_GIB, "seq_parallel": 2})
    group = WorkerGroup(spec, (0, 1), seq=True)
    group.start()
    try:
        group.wait_ready(300)
        backend = RemoteBackend(group, build_backend(spec, 0))
        runs = []
        for granularity in ("block", "phase"):
            memory = dict(SPEC["memory"], offload_granularity=granularity)
            model = backend.load(backend.load_key(memory), lambda p: None)
            collect = _Collect()
            frames = model.generate(RunSpec(**{**SPEC, "memory": memory}), collect.hooks)
            assert frames.shape == (49, 480, 832, 3) and collect.steps == [1, 2, 3, 4]
            describe = backend.describe()
            assert "attention_chosen_by_measurement" in describe["compat_fixes"]
            assert "parallel_env_initialised_once" in describe["compat_fixes"]
            chosen = describe["kernels"]["attention"]
            assert chosen and all(c["ranks"] == 2 and c["source"] in ("measured", "cached") for c in chosen), chosen
            runs.append({"granularity": granularity, "attention": [(c["shape"], c["backend"], c["source"]) for c in chosen],
                         "per_gpu_peaks": group.per_gpu_peaks()})
        assert group.restarts == 0
        gpu_report("multigpu_seq_auto_attention_rebuild", runs=runs)
    finally:
        group.close()


@needs_two
def test_two_lanes_run_two_clips_at_once(tiny_ckpt, tmp_path, gpu_report):
    from pipeline.store.history import History
    from pipeline.jobs import JobQueue
    from pipeline.store.outputs import OutputStore
    from pipeline.types import GenerationRequest
    from pipeline.workers.setup import multi_gpu_services
    from presets import load_presets

    outputs = OutputStore(tmp_path / "outputs")
    outputs.ensure()
    history = History(tmp_path / "outputs" / "history.sqlite3")
    # One attention kernel forced, as in the seq tests: with "auto" each new worker measures the
    # kernels at its first run of a shape (seconds per worker, and this test is about lanes).
    spec = BackendSpec("lightx2v", {"weights_dir": str(tiny_ckpt), "vram_cap_gib": CAP_GIB,
                                    "attention": "sdpa_flash"})
    services, groups = multi_gpu_services(mode="lanes", gpus=(0, 1), backend_spec=spec, presets=load_presets(),
                                          outputs=outputs, history=history)
    queue = JobQueue(services[0], lanes=services)
    try:
        request = dict(prompt="a red kite", preset="480x832x49")
        warm = queue.submit_all([GenerationRequest(seed=s, **request) for s in (1, 2)])
        for job in warm:
            assert job.done.wait(600) and job.error is None, job.error
        started = time.monotonic()
        alone = queue.submit(GenerationRequest(seed=3, **request))
        assert alone.done.wait(600) and alone.error is None
        one_s = time.monotonic() - started
        started = time.monotonic()
        pair = queue.submit_all([GenerationRequest(seed=s, **request) for s in (4, 5)])
        for job in pair:
            assert job.done.wait(600) and job.error is None, job.error
        two_s = time.monotonic() - started
        assert sorted(j.lane for j in pair) == [0, 1]
        assert {tuple(j.result.record["gpus"]["gpu_indices"]) for j in pair} == {(0,), (1,)}
        # Reported, not asserted: the speed target ("two clips in about the time of one") is
        # bench.multigpu's lanes row on the full-size checkpoint. On the tiny one the host-side mp4
        # encodes of noise frames weigh more than the GPU work (2x H200, 2026-11-30: 7.29 s for two
        # clips against 4.24 s for one).
        split = [{"lane": j.lane, "until_encode_s": j.result.record["timings_s"].get("total"),
                  "writing_mp4_s": j.result.record["timings_s"].get("writing mp4")} for j in (alone, *pair)]
        gpu_report("multigpu_lanes_tiny", one_clip_s=one_s, two_clips_s=two_s, clips=split,
                   frames_via_shm=[g.frames_dir is not None for g in groups])
    finally:
        queue.shutdown()
        for group in groups:
            group.close()

"""bench/run.py's report, on CPU: the benchmark itself needs CUDA (run on the device)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bench.run import OURS_VARIANTS, PEER_SKIP, frames_hash, markdown, streaming_columns
from pipeline.backends import lightx2v_compat as compat

META = {"date": "2026-11-27", "gpu": "Test GPU", "budget_gib": 11.0, "torch": "2", "cuda": "13", "triton": "3",
        "sageattention": "1.0.6", "lightx2v_commit": "f8aee98b", "quant_scheme": "int8-triton",
        "attn_mode": "sage_attn2", "alloc_conf": "expandable_segments:True", "checkpoint": "synthetic"}


def _row(**overrides):
    row = {"config": "ours", "preset": "480x832x49", "rung": "fast", "result": "ok", "failed_phase": None,
           "load_s": 70.0, "text_encoder_s": 0.12, "steps_s": [4.0, 1.6, 1.6, 1.7], "step_s": 1.633,
           "decode_s": 1.5, "mp4_s": 1.4, "total_s": 12.0, "reserved_peak_gib": {"denoising": 4.0, "VAE decode": 8.3},
           "nvml_peak_gib": {"VAE decode": 7.2}, "peak_reserved_gib": 8.3, "peak_nvml_gib": 7.2,
           "frames_sha256": "96d38a38db8c5ecc", "host_peak_gib": 21.4, "host_file_gib": 3.2,
           "stream_gb_per_step": 0, "step_s_nvme": None, "step_s_sata": None}
    row.update(overrides)
    return row


def test_every_report_row_has_the_header_columns_and_the_frames_hash():
    rows = [_row(), _row(config="ours-perstep", load_s=None),
            _row(config="lightx2v-recipe", result="OOM", failed_phase="denoising", steps_s=[], step_s=None, frames_sha256=None),
            {"config": "ours", "build": {}, "result": "load failed: boom"}]
    table = [line for line in markdown(META, rows).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert {line.count("|") for line in table} == {table[0].count("|")}
    assert table[0].rstrip(" |").endswith("frames")
    assert table[2].rstrip(" |").endswith("96d38a38db8c5ecc") and "OOM (denoising)" in table[4]


def test_frames_hash_is_the_hash_of_the_frames_in_any_memory_layout():
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    expected = hashlib.sha256(frames.tobytes()).hexdigest()[:16]
    assert frames_hash(frames) == expected
    assert frames_hash(np.asfortranarray(frames)) == expected
    changed = frames.copy()
    changed[1, 2, 3, 0] ^= 1
    assert frames_hash(changed) != expected


def _optimisations(backend) -> dict[str, bool]:
    """Which of our optimisations a backend built from a variant runs with."""
    fixes = compat.CompatFixes(skip=backend.compat_skip)
    on = {name: fixes.wanted(name) for name in compat.OPTIMIZATION_NAMES}
    on["ffn_chunked_over_tokens"] = on["ffn_chunked_over_tokens"] and backend.ffn_chunk_tokens > 0
    return on


@pytest.mark.parametrize("variant", sorted(OURS_VARIANTS))
def test_each_bench_variant_switches_off_a_real_optimisation(variant, tmp_path, monkeypatch):
    from pipeline.backends.lightx2v import LightX2VBackend

    # A bench that measures the opt-in changes names them (WAN_STUDIO_OPT_IN).
    monkeypatch.setenv(compat.OPT_IN_ENV, ",".join(sorted(compat.OPT_IN_NAMES)))

    for name in OURS_VARIANTS[variant].get("compat_skip", set()) | PEER_SKIP:
        compat.CompatFixes().wanted(name)  # raises KeyError for a name the compat layer does not know
    # Built the way bench.run_config builds them: "ours" runs every optimisation, each other
    # variant exactly one fewer (the DiT-block fusions count as one: ours-nofuse).
    ours = _optimisations(LightX2VBackend(tmp_path, **OURS_VARIANTS["ours"]))
    assert all(ours.values()), ours
    built = _optimisations(LightX2VBackend(tmp_path, **OURS_VARIANTS[variant]))
    off = sorted({"fusions" if name in compat.FUSION_NAMES else name for name, on in built.items() if not on})
    assert len(off) == (0 if variant == "ours" else 1), (variant, off)


def test_latest_json_lists_each_run_with_the_mean_of_steps_2_to_4():
    from bench.run import latest_runs

    rows = [_row(steps_s=[4.0, 1.5, 1.6, 1.7]), _row(config="lightx2v-resident", steps_s=[3.0, 2.0, 2.2, 2.4, 9.0]),
            _row(config="lightx2v-recipe", result="OOM", steps_s=[], step_s=None),
            {"config": "ours", "build": {}, "result": "load failed: boom"}]
    runs = latest_runs(META, rows)
    assert [r["config"] for r in runs] == ["ours", "lightx2v-resident", "lightx2v-recipe"]
    for r in runs:
        assert {"gpu", "date", "config", "preset", "s_per_step", "peak_reserved_gib", "host_peak_gib",
                "host_file_gib"} <= set(r)
        assert r["gpu"] == "Test GPU" and r["date"] == "2026-11-27"
    assert runs[0]["s_per_step"] == 1.6 and runs[1]["s_per_step"] == 2.2 and runs[2]["s_per_step"] is None


def test_lightx2v_configs_switch_every_kernel_hook_off_and_old_names_still_work():
    from bench.run import ALIASES, KERNEL_SKIP

    assert KERNEL_SKIP <= PEER_SKIP
    assert {"attention_chosen_by_measurement", "int8_gemm_tiles_for_this_gpu", *compat.FUSION_NAMES} == KERNEL_SKIP
    assert ALIASES == {"peer": "lightx2v-recipe", "resident": "lightx2v-resident"}


def test_kernels_used_names_the_measured_choice_or_lightx2vs_kernel():
    from types import SimpleNamespace

    from bench.run import kernels_used

    fixes = compat.CompatFixes()
    fixes.record("int8_gemm_tiles_for_this_gpu", "INT8 GEMM autotune over 128x128x64/s4/w4")
    selector = SimpleNamespace(summary=lambda: [{"shape": "32760x40x128", "backend": "sdpa_cudnn", "source": "measured",
                                                 "trials": {}}])
    ours = kernels_used(SimpleNamespace(attention_selector=selector, compat=fixes, build={"attn_mode": "sage_attn2"}))
    assert ours["attention"] == [{"shape": "32760x40x128", "backend": "sdpa_cudnn", "source": "measured"}]
    assert ours["int8_gemm"].startswith("INT8 GEMM autotune")
    theirs = kernels_used(SimpleNamespace(attention_selector=None, compat=compat.CompatFixes(),
                                          build={"attn_mode": "sage_attn2"}))
    assert theirs == {"attention": "sage_attn2 (LightX2V's)", "int8_gemm": "LightX2V's autotune list"}


def test_host_columns_and_the_streaming_formula():
    rows = [_row(), _row(rung="low-ram", host_peak_gib=8.7, host_file_gib=0.9,
                         **streaming_columns(14_100_000_000, 3.0, [14_000_000_000, 200_000_000]))]
    table = [line for line in markdown(META, rows).splitlines() if line.startswith("|")]
    assert {line.count("|") for line in table} == {table[0].count("|")}
    assert "| host | host file | streamed GB | NVMe s/step | SATA s/step |" in table[0]
    low = rows[1]
    # 14.1 GB per step: 4.7 s on a 3 GB/s NVMe (slower than the 3.0 s computed), 28.2 s on SATA.
    assert (low["step_s_nvme"], low["step_s_sata"]) == (4.7, 28.2)
    assert low["stream_gb_per_step"] == 14.1 and low["disk_read_gb_per_step"] == 7.1
    assert " 8.7 | 0.9 | 14.1 | 4.7 | 28.2 |" in table[3]
    fast = streaming_columns(0, 1.6, [])
    assert fast == {"stream_gb_per_step": 0.0, "disk_read_gb_per_step": None, "step_s_nvme": None,
                    "step_s_sata": None}


def test_preview_bench_report_has_a_row_per_preset_and_the_targets():
    from bench.preview import markdown as preview_markdown

    row = {"preset": "480x832x81", "rung": "fast", "step_s": 3.175, "peak_gib": 9.1,
           "linear": {"kind_used": ["linear"], "cost_ms": [2.1, 1.9, 2.0, 2.2], "share_of_step": 0.00069,
                      "extra_peak_gib": 0.004},
           "tiny-vae": {"kind_used": ["tiny-vae"], "cost_ms": [40.0, 38.5, 39.0, 39.2],
                        "share_of_step": 0.0126, "extra_peak_gib": 0.2},
           "decode": {"full_s": 2.9, "full_peak_gib": 8.2, "tiny_s": 0.4, "tiny_peak_gib": 0.6, "speed_up": 7.25}}
    meta = {"date": "2026-11-30", "gpu": "Test GPU", "budget_gib": 11.0, "torch": "2", "checkpoint": "synthetic",
            "command": "python -m bench.preview"}
    text = preview_markdown(meta, [row])
    assert "| 480x832x81 | fast | 3.175 | 2.2 | 0.07 % | 0.004 | 40.0 | 1.26 % | 0.200 | 2.90 / 8.20 | 0.40 / 0.60 | 7.25× |" in text
    assert "≤ 1 % of a step" in text and "Test GPU (2026-11-30)" in text


def test_host_memory_bench_keeps_each_parts_peak_per_phase():
    import numpy as np

    from bench.host_memory import GIB, PhasePeaks

    peaks = PhasePeaks(interval_s=60)  # sampled by hand below, not by its thread
    peaks.phase = "quiet"
    peaks.sample()
    peaks.phase = "holding"
    held = np.ones(256 * 2**20 // 8)  # 256 MiB of anonymous memory, touched
    peaks.sample()
    del held
    by_phase = peaks.as_gib()
    assert set(by_phase) == {"quiet", "holding"}
    assert {"RssAnon", "RssShmem", "RssFile", "pinned", "must_hold", "file_backed"} <= set(by_phase["holding"])
    grown = peaks.peaks["holding"]["RssAnon"] - peaks.peaks["quiet"]["RssAnon"]
    assert grown >= 0.9 * 256 * 2**20 and by_phase["holding"]["must_hold"] >= by_phase["quiet"]["must_hold"] + 0.2
    assert GIB == 2**30


def test_multigpu_lanes_row_alone_through_the_job_queue(tmp_path):
    """`--configs lanes` runs by itself (no seq check, no 1-GPU rows) through the app's queue and
    services; the row has one clip's time, N clips' time and their ratio, and every clip's split."""
    import json

    from bench import multigpu

    out = tmp_path / "bench"
    assert multigpu.main(["--ckpt", str(tmp_path), "--gpus", "0,1", "--configs", "lanes", "--backend", "fake",
                          "--out", str(out)]) == 0
    latest = json.loads((out / "latest.json").read_text())
    assert [(r["config"], r["preset"], r["result"]) for r in latest] == [("ours-2gpu-lanes", "480x832x49", "ok")]
    row = latest[0]
    assert row["clips_together"] == 2 and row["lane_indices"] == [0, 1]
    # The ratio is of the unrounded times; each of the three is rounded to 3 decimals (a fake clip
    # takes ~0.1 s, where that rounding moves the ratio of the rounded times by more than 0.01).
    half = 5e-4
    low = (row["together_s"] - half) / (row["one_clip_s"] + half) - half
    high = (row["together_s"] + half) / (row["one_clip_s"] - half) + half
    assert low <= row["together_vs_one"] <= high, (low, row["together_vs_one"], high)
    run = json.loads(next(out.glob("multigpu-*.json")).read_text())["runs"][0]
    assert sorted(c["lane"] for c in run["lanes"]) == [0, 1]
    for clip in [run["alone"], *run["lanes"]]:
        assert clip["until_encode_s"] > 0 and clip["writing_mp4_s"] > 0 and len(clip["steps_s"]) == 4


class _CudaClock:
    """torch as PhaseProbe uses it: synchronize and the allocator's peak counter."""

    class cuda:
        @staticmethod
        def synchronize():
            pass

        @staticmethod
        def max_memory_reserved():
            return 0

        @staticmethod
        def reset_peak_memory_stats():
            pass


class _NoGpu:
    def read(self):
        return None


def test_cold_cache_drops_the_block_files_before_denoising_and_between_steps_outside_the_timing(tmp_path, monkeypatch):
    import os
    import time

    from bench import run
    from pipeline.types import Phase

    blocks = [tmp_path / f"block_{i}.safetensors" for i in range(3)]
    for b in blocks:
        b.write_bytes(b"x" * 4096)
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice) or real(fd, off, n, advice))
    drops = []

    def drop():
        drops.append(len(probe.steps))
        run.drop_from_page_cache(blocks)
        time.sleep(0.05)  # a slow drop must not count as step time

    probe = run.PhaseProbe(_CudaClock, _NoGpu(), 0)
    probe.before_each_step = drop
    try:
        probe.on_phase(Phase.TEXT_ENCODING)
        assert drops == []  # only the denoising steps read the blocks
        probe.on_phase(Phase.DENOISING)
        for i in range(1, 5):
            probe.on_step(i, 4)
    finally:
        probe.finish()
    assert drops == [0, 1, 2, 3]  # before step 1, then after every step but the last
    assert advised == [os.POSIX_FADV_DONTNEED] * 3 * 4
    assert max(probe.steps) < 0.05 and len(probe.steps) == 4
    assert probe.seconds["denoising"] < 0.05  # nor in the phase's time


def test_cold_cache_is_a_flag_of_the_bench_and_marks_its_rows():
    from bench.run import build_parser

    assert build_parser("b", "d", "ours").parse_args(["--cold-cache"]).cold_cache
    assert not build_parser("b", "d", "ours").parse_args([]).cold_cache
    row = _row(rung="low-ram", cold_cache=True, **streaming_columns(14_100_000_000, 5.0, [14_000_000_000]))
    line = [line for line in markdown(META, [row]).splitlines() if line.startswith("| ours")][0]
    assert "| low-ram (cold page cache) |" in line

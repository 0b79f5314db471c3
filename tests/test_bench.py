"""bench/run.py's report, on CPU: the benchmark itself needs CUDA (run on the device)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bench.run import OURS_VARIANTS, PEER_SKIP, frames_hash, markdown
from pipeline.backends import lightx2v_compat as compat

META = {"date": "2026-11-27", "gpu": "Test GPU", "budget_gib": 11.0, "torch": "2", "cuda": "13", "triton": "3",
        "sageattention": "1.0.6", "lightx2v_commit": "f8aee98b", "quant_scheme": "int8-triton",
        "attn_mode": "sage_attn2", "alloc_conf": "expandable_segments:True", "checkpoint": "synthetic"}


def _row(**overrides):
    row = {"config": "ours", "preset": "480x832x49", "rung": "fast", "result": "ok", "failed_phase": None,
           "load_s": 70.0, "text_encoder_s": 0.12, "steps_s": [4.0, 1.6, 1.6, 1.7], "step_s": 1.633,
           "decode_s": 1.5, "mp4_s": 1.4, "total_s": 12.0, "reserved_peak_gib": {"denoising": 4.0, "VAE decode": 8.3},
           "nvml_peak_gib": {"VAE decode": 7.2}, "peak_reserved_gib": 8.3, "peak_nvml_gib": 7.2,
           "frames_sha256": "96d38a38db8c5ecc"}
    row.update(overrides)
    return row


def test_every_report_row_has_the_header_columns_and_the_frames_hash():
    rows = [_row(), _row(config="ours-perstep", load_s=None),
            _row(config="peer", result="OOM", failed_phase="denoising", steps_s=[], step_s=None, frames_sha256=None),
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


@pytest.mark.parametrize("variant", sorted(OURS_VARIANTS))
def test_each_bench_variant_switches_off_a_real_optimisation(variant):
    skip = OURS_VARIANTS[variant].get("compat_skip", set())
    for name in skip | PEER_SKIP:
        compat.CompatFixes().wanted(name)  # raises KeyError for a name the compat layer does not know
    if variant == "ours":
        assert OURS_VARIANTS[variant] == {}
    else:
        assert skip <= set(compat.OPTIMIZATION_NAMES) and (skip or OURS_VARIANTS[variant].get("ffn_chunk_tokens") == 0)


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

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


def _optimisations(backend) -> dict[str, bool]:
    """Which of our optimisations a backend built from a variant runs with."""
    fixes = compat.CompatFixes(skip=backend.compat_skip)
    on = {name: fixes.wanted(name) for name in compat.OPTIMIZATION_NAMES}
    on["ffn_chunked_over_tokens"] = on["ffn_chunked_over_tokens"] and backend.ffn_chunk_tokens > 0
    return on


@pytest.mark.parametrize("variant", sorted(OURS_VARIANTS))
def test_each_bench_variant_switches_off_a_real_optimisation(variant, tmp_path):
    from pipeline.backends.lightx2v import LightX2VBackend

    for name in OURS_VARIANTS[variant].get("compat_skip", set()) | PEER_SKIP:
        compat.CompatFixes().wanted(name)  # raises KeyError for a name the compat layer does not know
    # Built the way bench.run_config builds them: "ours" runs every optimisation, each other
    # variant exactly one fewer.
    ours = _optimisations(LightX2VBackend(tmp_path, **OURS_VARIANTS["ours"]))
    assert all(ours.values()), ours
    built = _optimisations(LightX2VBackend(tmp_path, **OURS_VARIANTS[variant]))
    off = sorted(name for name, on in built.items() if not on)
    assert len(off) == (0 if variant == "ours" else 1), (variant, off)
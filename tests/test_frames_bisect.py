"""bench.frames_bisect names the switch that changes the frames (the GPU run is the lead's; here
its bookkeeping runs on a stand-in model whose arithmetic one switch really changes)."""

from __future__ import annotations

import numpy as np

from pipeline.backends import lightx2v_compat as compat


class _Model:
    def __init__(self, attention: str = "measured"):
        self.compat = compat.CompatFixes()
        self.chunked = True
        self.attention = attention
        self.attention_selector = None
        # A pure memory move (frames must not change) and a switch that changes the arithmetic.
        self.compat.record("non_block_weights_kept_for_the_run", "moves weights", undo=lambda: None,
                           redo=lambda: None)
        self.compat.record("ffn_chunked_over_tokens", "slices", undo=lambda: setattr(self, "chunked", False),
                           redo=lambda: setattr(self, "chunked", True))
        self.compat.record("explicit_t5_checkpoint_path", "build time")

    def generate(self, spec, hooks):
        value = 1 + (0 if self.chunked else 1) + (0 if self.attention == "measured" else 2)
        return np.full((2, 4, 4, 3), value, dtype=np.uint8)


class _Cache:
    def release(self):
        pass


def test_the_bisect_names_the_switch_that_moves_the_frames():
    from bench.frames_bisect import _spec, bisect

    def load(**kwargs):
        return _Cache(), _Model("sage" if kwargs.get("attention") == "sage_attn2" else "measured")

    result = bisect(load, _spec("256x448x9", 3))
    same = {row["run"]: row["same_as_first"] for row in result["rows"]}
    assert same["everything on, again"] is True and same["no per-step preview"] is True
    assert same["without non_block_weights_kept_for_the_run"] is True
    assert same["without ffn_chunked_over_tokens"] is False  # the one that changes the arithmetic
    assert same["without explicit_t5_checkpoint_path"] is None  # build time: not re-run
    assert same["SageAttention forced (another build)"] is False
    assert result["shape"] == "256x448x9" and result["seed"] == 3

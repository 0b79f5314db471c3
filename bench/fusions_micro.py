"""Microbenchmark of each fused DiT-block kernel (pipeline/backends/fused_kernels.py) against the
eager chain LightX2V runs, at the model's shapes, on random tensors (no checkpoint):

    python -m bench.fusions_micro [--tokens 32760,75600] [--reps 10]

Per kernel and token count: eager and fused milliseconds, the speed-up, whether the outputs are
bit-identical, and the saving per DiT step (40 blocks; RoPE x2 for q and k, RMSNorm x3 for the
q/k of self-attention and the q of cross-attention, gate + residual x2). Prints markdown.
"""

from __future__ import annotations

import argparse
import sys

from bench.kernels_micro import _time

HEADS, HEAD_DIM, DIM, BLOCKS = 40, 128, 5120, 40


def rows(torch, tokens: int, reps: int) -> list[dict]:
    from lightx2v.common.ops.norm import rms_norm_weight
    from lightx2v.common.ops.rope.torch_rope import TorchComplexRope
    from pipeline.backends import fused_kernels as fk

    out = []
    rope = TorchComplexRope(layout="interleaved", compute_dtype=torch.float32)
    form = fk.rope_variant_matching(lambda x, f: rope.apply_single(x, f), "cuda")
    q = torch.randn((tokens, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    angles = torch.rand((tokens, 1, HEAD_DIM // 2), device="cuda") * 1024
    freqs = torch.polar(torch.ones_like(angles), angles)
    out.append(_row(torch, "rope (q or k)", 2, reps, lambda: rope.apply_single(q, freqs),
                    lambda: fk.rope(q, freqs, form or (0, 0)), tokens))
    norm = rms_norm_weight.RMSWeightSgl("n.weight")
    norm.weight = torch.ones((DIM,), device="cuda", dtype=torch.bfloat16)
    x = torch.randn((tokens, DIM), device="cuda", dtype=torch.bfloat16)
    out.append(_row(torch, "rms_norm (q/k)", 3, reps, lambda: norm.apply(x),
                    lambda: fk.rms_norm(x, norm._get_actual_weight(), norm.eps), tokens))
    y = torch.randn((tokens, DIM), device="cuda", dtype=torch.bfloat16)
    gate = torch.randn((DIM,), device="cuda", dtype=torch.bfloat16)
    base = x.clone()
    out.append(_row(torch, "gate_residual", 2, reps, lambda: base.clone().add_(y * gate),
                    lambda: fk.gate_residual_(base.clone(), y, gate), tokens, clone_ms=_time(torch, base.clone, reps)))
    return out


def _row(torch, name, per_block, reps, eager, fused, tokens, clone_ms=0.0) -> dict:
    identical = bool(torch.equal(eager(), fused()))
    e, f = _time(torch, eager, reps) - clone_ms, _time(torch, fused, reps) - clone_ms
    return {"kernel": name, "tokens": tokens, "eager_ms": e * 1e3, "fused_ms": f * 1e3, "speedup": e / f,
            "bit_identical": identical, "step_saving_s": (e - f) * per_block * BLOCKS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fusions_micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="32760,75600")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    lines = ["| kernel | tokens | eager ms | fused ms | speed-up | bit-identical | saving s/step |", "|---|---|---|---|---|---|---|"]
    for tokens in (int(t) for t in args.tokens.split(",") if t):
        for r in rows(torch, tokens, args.reps):
            lines.append(f"| {r['kernel']} | {r['tokens']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} | "
                         f"{r['speedup']:.2f}x | {r['bit_identical']} | {r['step_saving_s']:.3f} |")
        torch.cuda.empty_cache()
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

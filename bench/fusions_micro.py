"""Microbenchmark of each fused DiT-block kernel (pipeline/backends/fused_kernels.py) against the
eager chain LightX2V runs, at the model's shapes, on random tensors (no checkpoint):

    python -m bench.fusions_micro [--tokens 32760,75600] [--reps 10]

Per kernel and token count: eager and fused milliseconds, the speed-up, whether the outputs are
bit-identical, and the saving per DiT step (40 blocks; RoPE x2 for q and k, RMSNorm x3 for the
q/k of self-attention and the q of cross-attention, gate + residual x2, LayerNorm + modulate x2
before self-attention and the FFN, GELU + INT8 quantisation of ffn_2's input x1). Prints markdown.
"""

from __future__ import annotations

import argparse
import sys

from bench.kernels_micro import _time

HEADS, HEAD_DIM, DIM, FFN, BLOCKS = 40, 128, 5120, 13824, 40


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
    norm, eager = lightx2v_norm_and_modulate()
    norm_form = fk.norm_modulate_form_matching(eager, "cuda", eps=norm.eps)
    shift, scale = (torch.randn((1, 6, DIM), device="cuda", dtype=torch.bfloat16) * 0.5).chunk(6, dim=1)[:2]
    out.append(_row(torch, "layer_norm + modulate", 2, reps, lambda: eager(x, scale, shift),
                    lambda: fk.norm_modulate(x, scale, shift, norm.eps, norm_form or (0, 0)), tokens))
    out.append(gelu_quant_row(torch, tokens, reps))
    return out


def gelu_quant_row(torch, tokens: int, reps: int) -> dict:
    """LightX2V's `gelu(y, approximate="tanh")` then ffn_2's int8_quantize_triton, against the fused
    kernel, on ffn_0-like outputs [tokens, 13824]."""
    from lightx2v.common.ops.mm.triton_kernels import int8_quantize_triton

    from pipeline.backends import fused_kernels as fk

    def gelu(t):
        return torch.nn.functional.gelu(t, approximate="tanh")

    form = fk.gelu_quant_form_matching(gelu, int8_quantize_triton, "cuda")
    y = torch.randn((tokens, FFN), device="cuda", dtype=torch.bfloat16) * 2
    row = _row(torch, "gelu + int8 quant (ffn_2 in)", 1, reps, lambda: int8_quantize_triton(gelu(y)),
               lambda: fk.gelu_quant(y, form if form is not None else fk.GELU_FORMS[0]), tokens,
               same=lambda a, b: all(torch.equal(p, q) for p, q in zip(a, b, strict=True)))
    return {**row, "form": form}


def lightx2v_norm_and_modulate():
    """LightX2V's LayerNorm of norm1/norm2 and its default (Triton) modulate, chained as in
    WanTransformerInfer."""
    from lightx2v.models.networks.wan.infer.triton_ops import fuse_scale_shift_kernel
    from lightx2v.utils.registry_factory import LN_WEIGHT_REGISTER

    norm = LN_WEIGHT_REGISTER["torch"]()
    return norm, lambda x, scale, shift: fuse_scale_shift_kernel(norm.apply(x), scale=scale, shift=shift).squeeze()


def _row(torch, name, per_block, reps, eager, fused, tokens, clone_ms=0.0, same=None) -> dict:
    identical = bool((same or torch.equal)(eager(), fused()))
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

"""Microbenchmarks of the kernel choices at the model's shapes, on random tensors (no checkpoint).

    python -m bench.kernels_micro [--out DIR] [--tokens 32760,75600] [--skip-gemm]

Attention (40 heads x 128, bf16, non-causal): every backend pipeline.backends.kernels offers on this
GPU, timed on the full sequence and on the query prefix the in-app measurement uses (to check that
the prefix ranks the backends as the full call does), with its relative L2 error against an fp32
reference on sampled rows, and the backend the app's rule would choose.

INT8 GEMM (M = tokens, K/N from 5120 and 13824): LightX2V's int8_gemm_bias_kernel with each tile of
kernels.INT8_GEMM_TILES alone, LightX2V's own autotune list, and the lists the compat layer installs
for this GPU's and for an sm_86 SM's shared memory; TOPS and the compiled kernel's shared memory
next to kernels.int8_gemm_smem_bytes.

Writes <out>/kernels-micro-<date>-<gpu>.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.backends import kernels

log = logging.getLogger("bench.kernels_micro")
HEADS, HEAD_DIM = 40, 128
GEMM_SHAPES = ((32760, 5120, 5120), (32760, 5120, 13824), (32760, 13824, 5120), (75600, 5120, 13824))


def _gemm_inputs(torch, tk, m: int, k: int, n: int):
    """A quantised activation [m, k] with its scales, an INT8 weight [n, k], its scales and a bias."""
    a = torch.randn((m, k), device="cuda", dtype=torch.bfloat16)
    aq, ascale = tk.int8_quantize_triton(a)
    del a
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    wscale = torch.rand((n,), device="cuda", dtype=torch.float32) / 100
    bias = torch.randn((n,), device="cuda", dtype=torch.float32)
    return aq, ascale, w, wscale, bias


def _time(torch: Any, fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def attention(torch: Any, tokens: list[int], reps: int) -> list[dict[str, Any]]:
    cap = torch.cuda.get_device_capability(0)
    try:
        import sageattention

        exports = dir(sageattention)
        entry = kernels.sage_entry_point(cap, exports)
        sage_fn = getattr(sageattention, entry) if entry else None
    except ImportError:
        exports, sage_fn = [], None
    fns = kernels.attention_functions(torch, sage_fn)
    offered = kernels.available_attention(cap, sage_exports=exports, cudnn_sdpa=torch.backends.cuda.cudnn_sdp_enabled(),
                                          flash_attn=kernels.FLASH_ATTN2 in fns, flash_attn3=kernels.FLASH_ATTN3 in fns)
    out = []
    for n in tokens:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn((n, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        started = time.perf_counter()
        trials = kernels.measure_attention(torch, q, k, v, fns, offered)
        measure_s = time.perf_counter() - started
        chosen = kernels.choose_attention(trials, offered[0] if offered else kernels.SDPA_EFFICIENT)
        flops = 4 * n * n * HEADS * HEAD_DIM
        rows = []
        for t in trials:
            full = None
            if t.error is None:
                full = _time(torch, lambda name=t.backend: fns[name](q, k, v), reps)
            rows.append({"backend": t.backend, "prefix_ms": None if t.seconds is None else round(t.seconds * 1e3, 3),
                         "full_ms": None if full is None else round(full * 1e3, 2),
                         "full_tflops": None if full is None else round(flops / full / 1e12, 1),
                         "rel_l2": t.rel_l2, "error": t.error})
            log.info("attention %d %s", n, rows[-1])
        del q, k, v
        torch.cuda.empty_cache()
        rank_prefix = [r["backend"] for r in sorted((r for r in rows if r["prefix_ms"]), key=lambda r: r["prefix_ms"])]
        rank_full = [r["backend"] for r in sorted((r for r in rows if r["full_ms"]), key=lambda r: r["full_ms"])]
        out.append({"tokens": n, "offered": offered, "chosen": chosen, "measure_s": round(measure_s, 2),
                    "rank_prefix": rank_prefix, "rank_full": rank_full, "backends": rows})
    return out


def _lightx2v_triton_kernels(lx_root: Path) -> Any:
    """LightX2V's triton_kernels.py loaded from its file (importing the package imports every runner)."""
    path = lx_root / "lightx2v" / "common" / "ops" / "mm" / "triton_kernels.py"
    spec = importlib.util.spec_from_file_location("lx_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled_shared(kernel: Any) -> int | None:
    """Shared memory of the kernel the autotuner last ran (best effort across Triton versions)."""
    try:
        caches = kernel.fn.device_caches
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            compiled = list(cache.values())
            if compiled:
                return int(compiled[-1].metadata.shared)
    except (AttributeError, TypeError, IndexError, KeyError):
        return None
    return None


def gemm(torch: Any, lx_root: Path, reps: int) -> dict[str, Any]:
    import triton

    tk = _lightx2v_triton_kernels(lx_root)
    kern = tk.int8_gemm_bias_kernel
    upstream = list(kern.configs)
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin

    def config(t):
        return triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1], "BLOCK_K": t[2], "SPLIT_K": 1}, num_stages=t[3], num_warps=t[4])

    lists = {"lightx2v": upstream,
             "ours(this gpu)": [config(t) for t in kernels.int8_gemm_tiles_for(smem)],
             "ours(sm_86 limit)": [config(t) for t in kernels.int8_gemm_tiles_for(kernels.SM86_SMEM_PER_BLOCK)]}
    for t in kernels.INT8_GEMM_TILES:
        lists["tile %dx%dx%d s%d w%d" % t] = [config(t)]
    results = []
    for m, k, n in GEMM_SHAPES:
        aq, ascale, w, wscale, bias = _gemm_inputs(torch, tk, m, k, n)
        ref = None
        for name, configs in lists.items():
            kern.configs = configs
            kern.cache = {}
            row = {"shape": f"{m}x{k}x{n}", "list": name}
            try:
                run = lambda: tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, output_dtype=torch.bfloat16)  # noqa: E731
                out = run()
                if ref is None:
                    ref = out
                row["identical_to_first"] = bool(torch.equal(out, ref))
                del out
                sec = _time(torch, run, reps)
                row.update(ms=round(sec * 1e3, 3), tops=round(2 * m * k * n / sec / 1e12, 1),
                           best=str(kern.best_config) if len(configs) > 1 else None,
                           compiled_shared=_compiled_shared(kern))
                if len(configs) == 1:
                    c = configs[0]
                    row["smem_formula"] = kernels.int8_gemm_smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                                       c.kwargs["BLOCK_K"], c.num_stages)
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile here is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            log.info("gemm %s", row)
            results.append(row)
        del aq, ascale, w, wscale, bias, ref
        torch.cuda.empty_cache()
    kern.configs = upstream
    return {"smem_per_block_optin": smem, "rows": results}


def gemm_ab(torch: Any, lx_root: Path, rounds: int, reps: int) -> list[dict[str, Any]]:
    """LightX2V's list against the list the compat layer installs on this GPU, interleaved round by
    round (the GPU's clocks drift over a run: back-to-back blocks of one list would favour the first)."""
    import triton

    tk = _lightx2v_triton_kernels(lx_root)
    kern = tk.int8_gemm_bias_kernel
    upstream = list(kern.configs)
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    ours = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": 1}, num_stages=s, num_warps=w)
            for m, n, k, s, w in kernels.int8_gemm_tiles_for(smem)]
    out = []
    for m, k, n in GEMM_SHAPES:
        aq, ascale, w, wscale, bias = _gemm_inputs(torch, tk, m, k, n)
        times: dict[str, list[float]] = {"lightx2v": [], "ours": []}
        picks: dict[str, str] = {}
        outs = {}
        for name, configs in (("lightx2v", upstream), ("ours", ours)):  # autotune each once
            kern.configs, kern.cache = configs, {}
            outs[name] = tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, output_dtype=torch.bfloat16)
            picks[name] = str(kern.best_config)
        caches = {}
        for name, configs in (("lightx2v", upstream), ("ours", ours)):
            kern.configs, kern.cache = configs, {}
            tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale, output_dtype=torch.bfloat16)
            caches[name] = dict(kern.cache)
        for _ in range(rounds):
            for name in ("lightx2v", "ours"):
                kern.configs, kern.cache = (upstream if name == "lightx2v" else ours), dict(caches[name])
                times[name].append(_time(torch, lambda: tk.int8_gemm_bias_triton(aq, w, bias, ascale, wscale,
                                                                                  output_dtype=torch.bfloat16), reps))
        med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        row = {"shape": f"{m}x{k}x{n}", "lightx2v_ms": round(med["lightx2v"] * 1e3, 3), "ours_ms": round(med["ours"] * 1e3, 3),
               "speedup": round(med["lightx2v"] / med["ours"], 3), "identical": bool(torch.equal(outs["lightx2v"], outs["ours"])),
               "lightx2v_pick": picks["lightx2v"][:60], "ours_pick": picks["ours"][:60],
               "lightx2v_tops": round(2 * m * k * n / med["lightx2v"] / 1e12, 1), "ours_tops": round(2 * m * k * n / med["ours"] / 1e12, 1)}
        log.info("gemm A/B %s", row)
        out.append(row)
        del aq, ascale, w, wscale, bias, outs
        torch.cuda.empty_cache()
    kern.configs, kern.cache = upstream, {}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels_micro")
    parser.add_argument("--out", default=os.environ.get("OUT", "docs/benchmarks"))
    parser.add_argument("--tokens", default="32760,75600")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--ab-rounds", type=int, default=0, help="interleaved A/B of the two GEMM lists, N rounds")
    parser.add_argument("--lx-root", type=Path, default=None, help="LightX2V source root (default: from the import path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)), "torch": torch.__version__,
            "command": "python -m bench.kernels_micro " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    result: dict[str, Any] = {"meta": meta}
    if not args.skip_attention:
        result["attention"] = attention(torch, [int(t) for t in args.tokens.split(",") if t], args.reps)
    lx_root = args.lx_root
    if lx_root is None:
        spec = importlib.util.find_spec("lightx2v")
        lx_root = Path(spec.submodule_search_locations[0]).parent if spec else Path(".gpu/lx")
    if not args.skip_gemm:
        result["gemm"] = gemm(torch, lx_root, args.reps)
    if args.ab_rounds:
        result["gemm_ab"] = gemm_ab(torch, lx_root, args.ab_rounds, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-micro-{meta['date'][:10]}-{meta['gpu'].replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    sys.stdout.write(json.dumps(result, default=str)[:6000] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

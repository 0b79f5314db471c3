"""Our INT8-QK attention (pipeline/backends/quant_attention.py; FP16 or FP8 PV, several tiles) against
cuDNN and SageAttention 1 on random q, k, v [tokens, 40, 128]: ms, TFLOPS, relative L2 error on 128
rows against fp32, repeatability.

    python -m bench.quant_attention_micro [TOKENS,...] [OUT.json]
"""
import json, sys, time, traceback
import torch
from pipeline.backends import kernels, quant_attention as qa

H, D = 40, 128
def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]

try:
    import sageattention
    sage = sageattention.sageattn
except Exception:
    sage = None
fns = kernels.attention_functions(torch, sage)
tokens = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32760,75600").split(",")]
tiles = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 4, 3), (64, 128, 4, 3),
         (128, 64, 4, 4), (128, 128, 8, 4)]
out = []
for n in tokens:
    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn((n, H, D), device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    rows = torch.linspace(0, n - 1, 128, device="cuda").round().long()
    ref = kernels.reference_rows(torch, q, k, v, rows)
    rn = torch.linalg.vector_norm(ref).item()
    flops = 4 * n * n * H * D
    def row(name, fn):
        try:
            kk = k.clone()
            o = fn(q, kk, v)
            rel = torch.linalg.vector_norm(o[rows].float() - ref).item() / rn
            rep = bool(torch.equal(o, fn(q, kk.copy_(k), v)))
            del o
            s = timed(lambda: fn(q, kk, v))
            r = {"tokens": n, "name": name, "ms": round(s * 1e3, 2), "tflops": round(flops / s / 1e12, 1), "rel_l2": float(f"{rel:.4g}"), "repeatable": rep}
        except Exception as e:
            r = {"tokens": n, "name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        print(json.dumps(r), flush=True); out.append(r)
        torch.cuda.empty_cache()
    row("sdpa_cudnn", fns[kernels.SDPA_CUDNN])
    if kernels.SAGE in fns:
        row("sage1", fns[kernels.SAGE])
    for pv in (torch.float16, torch.float8_e4m3fn):
        for tile in tiles:
            row(f"qa-{str(pv).split('.')[-1]}-{'x'.join(map(str, tile))}",
                lambda q_, k_, v_, tile=tile, pv=pv: qa.attention(q_, k_, v_, tile=tile, pv_dtype=pv))
    del q, k, v
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/o/qattn.json", "w"), indent=1)

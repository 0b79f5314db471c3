"""Benchmark previews and draft decodes, per preset, on a CUDA machine under a VRAM budget.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m bench.preview [--ckpt DIR] [--budget-gib 11.0]

On a full-size synthetic checkpoint (tools/synthetic_checkpoint.py; written to a temporary folder
unless --ckpt names one; a random taew2_1.pth is added beside its VAE when it has none), each preset
runs on its first memory rung:

  steps     mean seconds of steps 2-4 and the run's peak (torch allocated), previews off
  linear    the same run with a linear-factor preview after every step: cost per preview (ms, GPU
            work included), its share of a step, and the extra peak over "steps"
  tiny-vae  the same with tiny-VAE previews
  decode    the kept latents decoded again: the full VAE (the preset's rung settings) and the tiny
            VAE (draft), seconds and peak each

Targets (issue 12): a linear preview <= 1 % of a step and <= 0.1 GiB extra peak; a draft decode
several times faster than the full VAE and under 1 GiB. Writes <out>/<date>-<gpu>-preview.json
and .md (default docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.preview")
GIB = 1024**3
PROMPT = "A man with short gray hair plays a red electric guitar."
SEED = 42
PRESETS = ("480x832x49", "480x832x81", "720x1280x81")


def timed_peak(torch: Any, work) -> tuple[Any, float, float]:
    """(what `work()` returns, its seconds, its peak allocated GiB), the GPU synchronised around it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = work()
    torch.cuda.synchronize()
    return out, time.perf_counter() - started, torch.cuda.max_memory_allocated() / GIB


class _Hooks:
    def __init__(self) -> None:
        self.step_at: list[float] = []
        self.previews: list[Any] = []
        self.latents: Any = None

    def run_hooks(self):
        from pipeline.backend import RunHooks

        def on_latents(latents: Any) -> None:
            self.latents = latents

        return RunHooks(on_phase=lambda p: None, on_step=lambda i, n: self.step_at.append(time.perf_counter()),
                        should_stop=lambda: False, on_preview=self.previews.append, on_latents=on_latents)

    def step_s(self) -> float | None:
        gaps = [b - a for a, b in zip(self.step_at, self.step_at[1:])]
        return sum(gaps) / len(gaps) if gaps else None


def measure_preset(model: Any, torch: Any, preset: Any, warmup: bool = True) -> dict[str, Any]:
    from pipeline.types import PreviewKind, RunSpec

    rung = preset.rungs[0]
    base = RunSpec(preset=preset.name, rung=rung.name, prompt=PROMPT, negative_prompt="", seed=SEED,
                   height=preset.height, width=preset.width, frames=preset.frames, steps=preset.steps,
                   shift=preset.shift, guidance=preset.guidance, memory=rung.settings(), preview=None)
    if warmup:
        # Triton compiles and the attention is measured in a run's first step, which step_s leaves
        # out (steps 2-4); the warm-up keeps them out of the first preview's cost too.
        model.generate(base, _Hooks().run_hooks())
    row: dict[str, Any] = {"preset": preset.name, "rung": rung.name}
    plain = _Hooks()
    _, _, peak_plain = timed_peak(torch, lambda: model.generate(base, plain.run_hooks()))
    row["step_s"], row["peak_gib"] = plain.step_s(), round(peak_plain, 3)
    for kind in (PreviewKind.LINEAR, PreviewKind.TINY_VAE):
        hooks = _Hooks()
        _, _, peak = timed_peak(torch, lambda: model.generate(replace(base, preview=kind), hooks.run_hooks()))
        costs = [p.cost_ms for p in hooks.previews]
        used = sorted({p.kind.value for p in hooks.previews})
        row[kind.value] = {"kind_used": used, "cost_ms": costs,
                           "share_of_step": (max(costs) / 1000 / row["step_s"]) if costs and row["step_s"] else None,
                           "extra_peak_gib": round(peak - peak_plain, 4)}
    latents = plain.latents
    decode_hooks = _Hooks().run_hooks()
    _, full_s, full_peak = timed_peak(torch, lambda: model.decode(latents, base, decode_hooks))
    _, tiny_s, tiny_peak = timed_peak(torch, lambda: model.decode(latents, replace(base, draft=True), decode_hooks))
    row["decode"] = {"full_s": round(full_s, 3), "full_peak_gib": round(full_peak, 3),
                     "tiny_s": round(tiny_s, 3), "tiny_peak_gib": round(tiny_peak, 3),
                     "speed_up": round(full_s / tiny_s, 2) if tiny_s else None}
    return row


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.2f} %"

    def ms(values: list[float]) -> str:
        return "—" if not values else f"{max(values):.1f}"

    lines = [f"# Previews and draft decodes, {meta['gpu']} ({meta['date']})", "",
             f"Budget {meta['budget_gib']} GiB, torch {meta['torch']}, checkpoint {meta['checkpoint']}. "
             f"Command: `{meta['command']}`.", "",
             "| preset | rung | s/step | linear preview ms (max) | share | extra peak GiB | tiny-VAE preview ms | "
             "share | extra peak GiB | full decode s / GiB | draft decode s / GiB | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lin, tiny, dec = r["linear"], r["tiny-vae"], r["decode"]
        lines.append(f"| {r['preset']} | {r['rung']} | {r['step_s']:.3f} | {ms(lin['cost_ms'])} | "
                     f"{pct(lin['share_of_step'])} | {lin['extra_peak_gib']:.3f} | {ms(tiny['cost_ms'])} | "
                     f"{pct(tiny['share_of_step'])} | {tiny['extra_peak_gib']:.3f} | "
                     f"{dec['full_s']:.2f} / {dec['full_peak_gib']:.2f} | {dec['tiny_s']:.2f} / "
                     f"{dec['tiny_peak_gib']:.2f} | {dec['speed_up']}× |")
    lines += ["", "Targets: linear preview ≤ 1 % of a step and ≤ 0.1 GiB extra peak; draft decode several "
              "times faster than the full VAE and under 1 GiB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.preview", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="a full-size (synthetic) checkpoint")
    parser.add_argument("--budget-gib", type=float, default=11.0)
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up run (a 720p run is a minute of device time)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from pipeline.backends.lightx2v import LightX2VBackend
    from pipeline.backends.weights_layout import locate
    from presets import load_presets
    from tools.synthetic_checkpoint import TINY_VAE_FILE, write_checkpoint, write_tiny_vae

    ckpt = args.ckpt or write_checkpoint(Path(tempfile.mkdtemp(prefix="wan-bench-")) / "full", "full").root
    files = locate(ckpt)
    if files.tiny_vae is None:
        if not files.synthetic:
            parser.error(f"{ckpt} has no {TINY_VAE_FILE}: install the tiny VAE first")
        write_tiny_vae(files.vae.parent / TINY_VAE_FILE)
    backend = LightX2VBackend(ckpt, vram_cap_gib=args.budget_gib)
    book = load_presets()
    rows = []
    model = None
    for name in args.presets:
        preset = book[name]
        key = backend.load_key(preset.rungs[0].settings())
        if model is None or model.build != dict(key.build_settings):
            if model is not None:
                model.release()
            model = backend.load(key, lambda p: None)
        rows.append(measure_preset(model, torch, preset, args.warmup))
        log.info("%s", json.dumps(rows[-1]))
    if model is not None:
        model.release()
    gpu = torch.cuda.get_device_name(0)
    meta = {"date": dt.date.today().isoformat(), "gpu": gpu, "budget_gib": args.budget_gib,
            "torch": torch.__version__, "checkpoint": "synthetic" if files.synthetic else str(ckpt),
            "command": "python -m bench.preview " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{meta['date']}-{gpu.replace(' ', '_')}-preview"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a step's GPU time goes: torch.profiler over one warm run per preset, kernels grouped.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m bench.profile [--ckpt DIR]
        [--configs ours,lightx2v-resident] [--presets 480x832x81] [--out docs/benchmarks]

The setup is bench/run.py's (synthetic full-size checkpoint unless --ckpt, backend construction,
VRAM cap, configurations; `ours` profiles each preset's first rung). Each preset runs twice: once
unprofiled (Triton autotuning, the attention measurement and cuDNN plans happen there), then once
under torch.profiler. Phases and steps are marked with profiler ranges at the backend's hooks
(which synchronise the GPU first), and each GPU kernel is counted in the range it started in.

Groups (by kernel name, first match): quantize (activation / Q, K INT8 quantisation), attention,
GEMM, copies/offload (memcpy/memset: host<->device weight and activation traffic), and the rest of
the DiT as elementwise/norm/RoPE. Kernels of the text encoder and VAE decode phases are counted as
`text encoder` and `VAE` whatever their names.

Writes <out>/profile-<date>-<gpu>.json and .md, with the command, GPU and date.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from bench.run import ALIASES, Bench, PhaseProbe, build_parser, environment, plan, prepare

log = logging.getLogger("bench.profile")

GROUPS = (
    ("quantize", re.compile(r"quant", re.I)),
    ("attention", re.compile(r"attn|attention|fmha|flash|sdpa|softmax", re.I)),
    ("GEMM", re.compile(r"gemm|matmul|_mm_|cutlass|xmma|cublas|nvjet|wgmma|s\d+_.*tensorop", re.I)),
    ("copies/offload", re.compile(r"^memcpy|^memset", re.I)),
)
ELEMENTWISE = "elementwise/norm/RoPE"
PHASE_GROUPS = {"text encoding": "text encoder", "VAE decode": "VAE"}
ORDER = ("attention", "GEMM", "quantize", ELEMENTWISE, "copies/offload", "text encoder", "VAE")


def kernel_group(name: str, window: str) -> str:
    """The group of one GPU kernel launched inside the marked range `window`."""
    for phase, group in PHASE_GROUPS.items():
        if window == f"phase {phase}":
            return group
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return ELEMENTWISE


def group_kernels(marks: Iterable[tuple[str, float, float]], kernels: Iterable[tuple[str, float, float]]
                  ) -> dict[str, dict[str, float]]:
    """{window: {group: seconds}} from marks (name, start_us, end_us) and kernels (name, start_us,
    duration_us); a kernel outside every mark is counted under "unmarked"."""
    marks = sorted(marks, key=lambda m: m[1])
    out: dict[str, dict[str, float]] = {}
    for name, start, duration in kernels:
        window = "unmarked"
        for mark, m_start, m_end in marks:
            if m_start <= start < m_end:
                window = mark
                break
        group = kernel_group(name, window)
        bucket = out.setdefault(window, {})
        bucket[group] = bucket.get(group, 0.0) + duration / 1e6
    return out


class MarkedProbe(PhaseProbe):
    """PhaseProbe that also opens a profiler range per phase and per denoising step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._range: Any = None

    def _mark(self, name: str) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
        self._range = self.torch.autograd.profiler.record_function(name)
        self._range.__enter__()

    def on_phase(self, phase: Any) -> None:
        super().on_phase(phase)
        self._mark("step 1" if phase.value == "denoising" else f"phase {phase.value}")

    def on_step(self, index: int, total: int) -> None:
        super().on_step(index, total)
        self._mark(f"step {index + 1}" if index < total else "phase after steps")

    def finish(self, name: str = "done") -> None:
        super().finish(name)
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None


class ProfileBench(Bench):
    probe_cls = MarkedProbe

    def __init__(self, args: Any, ckpt: Path):
        super().__init__(args, ckpt)
        self.profiles: list[dict[str, Any]] = []
        self._label = ""

    def run_config(self, label: str, backend_kwargs: dict[str, Any], runs: list, cap_gib: float | None) -> None:
        self._label = label
        super().run_config(label, backend_kwargs, runs, cap_gib)

    def generate(self, model: Any, spec: Any, probe: PhaseProbe, record: bool) -> Any:
        if not record:
            return model.generate(spec, probe.hooks())
        from torch.profiler import ProfilerActivity, profile

        from pipeline.backend import RunHooks

        # Warm at this shape: autotuning, the attention measurement and cuDNN plans stay out of the profile.
        model.generate(spec, RunHooks(on_phase=lambda phase: None, on_step=lambda i, n: None, should_stop=lambda: False))
        self.torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            frames = model.generate(spec, probe.hooks())
            self.torch.cuda.synchronize()
        self.profiles.append(summarise(prof, self._label, spec))
        return frames

    def _flush(self) -> None:
        # Only the profile: the rows' timings ran under the profiler, so they stay out of latest.json.
        if self.profiles:
            write_profile(self.args, self.torch, self.profiles)


def _is_mark(name: str) -> bool:
    return name.startswith("step ") or name.startswith("phase ")


def summarise(prof: Any, label: str, spec: Any) -> dict[str, Any]:
    from torch.autograd import DeviceType

    events = prof.events()
    marks = [(e.name, e.time_range.start, e.time_range.end) for e in events
             if e.device_type == DeviceType.CPU and _is_mark(e.name)]
    # Our ranges also appear on the GPU timeline (gpu_user_annotation): they are not kernels.
    kernels = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events
               if e.device_type == DeviceType.CUDA and not _is_mark(e.name)]
    windows = group_kernels(marks, kernels)
    steps = sorted((w for w in windows if w.startswith("step ")), key=lambda w: int(w.split()[1]))
    later = steps[1:4]
    mean = {g: sum(windows[w].get(g, 0.0) for w in later) / len(later) for g in ORDER} if later else {}
    total = sum(mean.values())
    return {"config": label, "preset": spec.preset, "rung": spec.rung,
            "shape": f"{spec.height}x{spec.width}x{spec.frames}",
            "windows": {w: {g: round(s, 4) for g, s in groups.items()} for w, groups in windows.items()},
            "steps": steps,
            "mean_step_2_4_s": {g: round(s, 4) for g, s in mean.items()},
            "mean_step_2_4_share": {g: round(s / total, 4) for g, s in mean.items()} if total else {},
            "kernel_s_per_step": round(total, 4),
            "top_kernels": _top(kernels, marks)}


def _top(kernels: list[tuple[str, float, float]], marks: list[tuple[str, float, float]], n: int = 15) -> list[dict[str, Any]]:
    step_ranges = [(s, e) for name, s, e in marks if name.startswith("step ")]
    totals: dict[str, float] = {}
    for name, start, duration in kernels:
        if any(s <= start < e for s, e in step_ranges):
            totals[name] = totals.get(name, 0.0) + duration / 1e6
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [{"kernel": name[:120], "group": kernel_group(name, "step"), "s_all_steps": round(s, 4)} for name, s in top]


def write_profile(args: Any, torch: Any, profiles: list[dict[str, Any]]) -> Path:
    meta = environment(torch, args)
    meta["date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta["command"] = "python -m bench.profile " + " ".join(getattr(args, "argv", []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{meta['date']}-{meta['gpu'].replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "profiles": profiles}, indent=2))
    (out / f"{stem}.md").write_text(profile_markdown(meta, profiles))
    return out / f"{stem}.md"


def profile_markdown(meta: dict[str, Any], profiles: list[dict[str, Any]]) -> str:
    lines = [f"# Kernel time per step, {meta['gpu']}, {meta['date_utc']}", "",
             f"`{meta['command']}`; torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
             f"sageattention {meta['sageattention']}, LightX2V {meta['lightx2v_commit']}. {meta['checkpoint']}.",
             "GPU kernel seconds (torch.profiler, one warm run); steps 2-4 averaged; step 1 apart.", ""]
    for p in profiles:
        steps = p["steps"]
        lines += [f"## {p['config']} {p['preset']} ({p['rung']}, {p['shape']})", "",
                  "| group | " + " | ".join(steps) + " | mean 2-4 | share |",
                  "|---|" + "---|" * (len(steps) + 2)]
        for g in ORDER:
            cells = [f"{p['windows'].get(w, {}).get(g, 0.0):.3f}" for w in steps]
            mean = p["mean_step_2_4_s"].get(g, 0.0)
            share = p["mean_step_2_4_share"].get(g, 0.0)
            if mean or any(float(c) for c in cells):
                lines.append(f"| {g} | " + " | ".join(cells) + f" | {mean:.3f} | {share:.1%} |")
        lines.append(f"| **all kernels** | " + " | ".join(f"{sum(p['windows'].get(w, {}).values()):.3f}" for w in steps)
                     + f" | {p['kernel_s_per_step']:.3f} | |")
        other = {w: sum(g.values()) for w, g in p["windows"].items() if not w.startswith("step ")}
        if other:
            lines += ["", "Outside the steps: " + ", ".join(f"{w}: {s:.3f} s" for w, s in sorted(other.items()))]
        lines += ["", "Top kernels over the steps:", "", "| kernel | group | s |", "|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['group']} | {k['s_all_steps']} |" for k in p["top_kernels"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m bench.profile", __doc__.split("\n\n")[0], "ours")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bench = prepare(args, ProfileBench)
    for config in [ALIASES.get(c, c) for c in args.configs.split(",") if c]:
        planned = plan(config, bench, args, first_rung_only=True)
        if planned is None:
            parser.error(f"unknown config {config!r}")
        bench.run_config(*planned)
    bench._flush()
    if bench.profiles:
        sys.stdout.write(profile_markdown({**environment(bench.torch, args), "command": "python -m bench.profile "
                                           + " ".join(args.argv), "date_utc": dt.datetime.now(dt.timezone.utc)
                                           .isoformat(timespec="seconds")}, bench.profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark every preset on every memory rung, on a CUDA machine, under a VRAM budget.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m bench.run [--ckpt DIR] [--budget-gib 11.0]

Uses a full-size synthetic checkpoint (tools/synthetic_checkpoint.py; written to a temporary
folder unless --ckpt names one): real kernels and real memory, random weights. PyTorch is capped at
the budget (default 11.0 GiB, a 12 GB RTX 3060 beside a desktop). For each configuration it
measures, per run: load time, text encoder, every denoising step, VAE decode and mp4 encode
(seconds), and per phase the peak of torch-reserved memory and of NVML device memory above the
level before the run. Configurations:

  ours      LightX2VBackend as the app runs it (every optimisation on), every preset on every rung
            of its preset file
  lightx2v-recipe
            LightX2V's own low-VRAM recipe (docs/lightx2v.md §2) (block offload, T5 offload, VAE on the
            GPU, untiled, only the fixes it needs to run: our fix 5 and every optimisation off)
  lightx2v-resident
            LightX2V with no offload, uncapped, its own kernels: the step-time reference of the
            targets (needs ~30 GB VRAM)
  ours-resident
            `lightx2v-resident` with our kernel choices (attention measured per GPU, INT8 GEMM tiles):
            what the kernels alone buy, same placement
  ours-nochunk, ours-perstep, ours-noattn, ours-nogemm, ours-nofuse, ours-hostsync
            `ours` without one optimisation (the FFN over token slices; the non-block weights
            kept on the GPU for a run; the measured attention kernel; the INT8 GEMM tiles; the fused
            elementwise chains of the DiT block; the streamed blocks ordered on the GPU), to
            measure what each buys and to bisect
  (`peer` and `resident` are the old names of the two LightX2V configurations.)

Host memory (issue 15): per run and during the load, the peak of what this process must hold
(anonymous + shared + pinned: `host_peak_gib`, load included) and of file-backed pages of mapped
weights (`host_file_gib`, which the kernel can drop), per phase in `host_by_phase_gib`. The low-RAM
rung (`--rungs low-ram`) reads the DiT blocks from disk on every step: each row gives the bytes
streamed per step (the block files' size) and the bytes the process read from storage per step
(/proc/self/io; page-cache hits excluded, so small on a machine with RAM to cache the files), and
what streaming means elsewhere, by formula: a step cannot take less than bytes / bandwidth, since
reading overlaps compute: `max(s/step here, bytes / 3 GB/s)` on a typical NVMe SSD and
`max(s/step here, bytes / 0.5 GB/s)` on a SATA SSD. `--cold-cache` measures this machine's own disk:
before the first step and after every step of a low-RAM run the block files are dropped from the
page cache (posix_fadvise DONTNEED: no root needed, clean pages only), so every step reads them
from storage; the row's disk-read column then shows the bytes really read.

Each row carries a hash of the frames: the same prompt and seed must give the same hash in every
configuration that only changes memory or copies (ours, ours-nochunk, ours-perstep, ours-hostsync).

It writes <out>/<date>-<gpu>.json and .md (default docs/benchmarks/), and <out>/latest.json: a list
of runs, each {"gpu", "date", "config", "preset", "s_per_step" (mean of steps 2-4),
"peak_reserved_gib", "kernels" (the attention kernel and GEMM tiles used)}, overwritten by each run. Each build starts with a small
unmeasured warm-up run so Triton's compilation stays out of the numbers; per-shape autotuning still
lengthens step 1, which is reported apart from the mean of steps 2-4.

To measure without expandable segments, export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False:
leaving it unset does not do it, because the backend then switches them on at runtime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.backends.lightx2v_compat import FUSION_NAMES, OPT_IN_ENV
from presets import build_settings

log = logging.getLogger("bench")
GIB = 1024**3
# Sequential read rates for the streaming formula (decimal GB/s, as disks are sold).
DISK_RATES_BPS = {"nvme": 3.0e9, "sata": 0.5e9}
PROMPT = "A man with short gray hair plays a red electric guitar."
SEED = 42


@dataclass
class PhaseProbe:
    """RunHooks for one run: phase/step times, and per-phase peaks (torch reserved via the
    allocator's peak counter, NVML via a 20 ms sampler)."""

    torch: Any
    nvml: Any  # pipeline.machine.gpu.GpuMonitor
    baseline_used: int
    t0: float = field(default_factory=time.perf_counter)
    phase: str = "start"
    phase_started: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    reserved_peak: dict[str, float] = field(default_factory=dict)
    nvml_peak: dict[str, float] = field(default_factory=dict)
    host: Any = None  # pipeline.machine.hostmem.HostPeaks, sampled in the same loop as NVML
    step_read_bytes: list[int | None] = field(default_factory=list)
    # Called before denoising starts and between steps, outside the timed span (--cold-cache).
    before_each_step: Callable[[], None] | None = None
    _last_step: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        from pipeline.machine import hostmem

        self._hostmem = hostmem
        self._host_reader = hostmem.HostReader(smaps_every=25)
        self.host = hostmem.HostPeaks()
        self._io_last = hostmem.read_io()
        self.phase_started = self._last_step = self.t0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            reading = self._host_reader()
            if reading is not None:
                self.host.note(self.phase, reading)
            snap = self.nvml.read()
            if snap is not None:
                above = (snap.used_bytes - self.baseline_used) / GIB
                self.nvml_peak[self.phase] = max(self.nvml_peak.get(self.phase, 0.0), above)

    def _close_phase(self, now: float) -> None:
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.phase_started
        self.reserved_peak[self.phase] = max(self.reserved_peak.get(self.phase, 0.0),
                                             self.torch.cuda.max_memory_reserved() / GIB)
        self.torch.cuda.reset_peak_memory_stats()

    def on_phase(self, phase: Any) -> None:
        self.torch.cuda.synchronize()
        now = time.perf_counter()
        self._close_phase(now)
        self.phase, self.phase_started, self._last_step = phase.value, now, now
        if phase.value == "denoising":
            self._between_steps()

    def _between_steps(self, last: bool = False) -> None:
        if self.before_each_step is not None and not last:
            started = time.perf_counter()
            self.before_each_step()
            self._last_step = time.perf_counter()
            self.phase_started += self._last_step - started  # nor in the phase's time
        self._io_last = self._hostmem.read_io()

    def on_step(self, index: int, total: int) -> None:
        self.torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append(now - self._last_step)
        self._last_step = now
        io = self._hostmem.read_io()
        self.step_read_bytes.append(None if io is None or self._io_last is None
                                    else io["read_bytes"] - self._io_last["read_bytes"])
        self._between_steps(last=index >= total)

    def finish(self, name: str = "done") -> None:
        self.torch.cuda.synchronize()
        self._close_phase(time.perf_counter())
        self.phase = name
        self._stop.set()
        self._thread.join(timeout=1)

    def hooks(self):
        from pipeline.backend import RunHooks

        return RunHooks(on_phase=self.on_phase, on_step=self.on_step, should_stop=lambda: False)


def _spec(preset: Any, memory: dict[str, Any]):
    from pipeline.types import RunSpec

    return RunSpec(preset=preset.name, rung="bench", prompt=PROMPT, negative_prompt="", seed=SEED,
                   height=preset.height, width=preset.width, frames=preset.frames, steps=preset.steps,
                   shift=preset.shift, guidance=preset.guidance, memory=memory)


def _mp4_writer():
    from pipeline.store import outputs

    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return outputs.write_mp4
    except (ImportError, RuntimeError):
        return outputs._write_mp4_pyav  # no ffmpeg binary here: PyAV's bundled encoder


class Bench:
    def __init__(self, args: argparse.Namespace, ckpt: Path):
        import torch

        from pipeline.machine.gpu import GpuMonitor
        from presets import load_presets

        self.args, self.ckpt, self.torch = args, ckpt, torch
        self.presets = load_presets()
        self.monitor = GpuMonitor()
        self.results: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.writer = _mp4_writer()
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-mp4-"))
        # What the low-RAM rung streams per step: every DiT block file once.
        self.block_files = sorted((Path(ckpt) / "distill_int8").glob("block_*.safetensors"))
        self.block_bytes = sum(f.stat().st_size for f in self.block_files)

    def time_left(self) -> float:
        return self.args.time_budget_s - (time.monotonic() - self.started)

    def set_cap(self, gib: float | None) -> None:
        total = self.torch.cuda.get_device_properties(0).total_memory
        self.torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total), 0)

    def run_config(self, label: str, backend_kwargs: dict[str, Any], runs: list[tuple[Any, str, dict[str, Any]]],
                   cap_gib: float | None) -> None:
        """Load once per build and run (preset, rung name, memory) in order."""
        from pipeline.backends.lightx2v import LightX2VBackend

        backend = LightX2VBackend(self.ckpt, vram_cap_gib=None, **backend_kwargs)
        by_key: dict[Any, list[tuple[Any, str, dict[str, Any]]]] = {}
        for run in runs:
            by_key.setdefault(backend.load_key(run[2]), []).append(run)
        for key, key_runs in by_key.items():
            if self.time_left() < 60:
                log.warning("time budget spent: skipping %s %s", label, dict(key.build_settings))
                continue
            self.set_cap(cap_gib)
            self.torch.cuda.empty_cache()
            started = time.perf_counter()
            from pipeline.machine.gpu import VramSampler

            # The app's sampler records host memory per phase; here the one phase is the load.
            with VramSampler(self.monitor, interval_s=0.05) as load_sampler:
                load_sampler.phase = "load"
                try:
                    model = backend.load(key, lambda phase: None)
                except Exception as exc:  # noqa: BLE001 - record and go on with the next build
                    model = None
                    error = exc
            if model is None:
                log.error("load failed: %s", error)
                self.results.append({"config": label, "build": dict(key.build_settings),
                                     "result": f"load failed: {error}",
                                     "host_load": load_sampler.timeline.host.as_record()})
                continue
            load_s = time.perf_counter() - started
            self.load_host = load_sampler.timeline.host.as_record()
            fixes = list(model.compat_fixes)
            if self.args.warmup:
                # One small run compiles every Triton kernel (the first run ever takes ~15 s more);
                # per-shape autotuning then only lengthens step 1, reported on its own.
                small = replace(key_runs[0][0], name="warmup", height=256, width=448, frames=9)
                self._one(model, small, "warmup", key_runs[0][2], label, None, fixes, record=False)
            for preset, rung, memory in key_runs:
                if self.time_left() < 30:
                    log.warning("time budget spent: skipping %s %s/%s", label, preset.name, rung)
                    continue
                self._one(model, preset, rung, memory, label, load_s, fixes, record=True)
                load_s = None  # only the first run of a build carries the load time
                self._flush()
            model.release()
            del model
            self.torch.cuda.empty_cache()

    def _one(self, model: Any, preset: Any, rung: str, memory: dict[str, Any], label: str, load_s: float | None,
             fixes: list[str], record: bool) -> None:
        from pipeline.machine.gpu import is_oom

        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        snap = self.monitor.read()
        probe = self.probe_cls(torch, self.monitor, snap.used_bytes if snap else 0)
        cold = bool(self.args.cold_cache and memory.get("dit_from_disk"))
        if cold:
            probe.before_each_step = lambda: drop_from_page_cache(self.block_files)
        outcome, frames, error, failed_phase = "ok", None, None, None
        try:
            frames = self.generate(model, _spec(preset, memory), probe, record)
        except Exception as exc:  # noqa: BLE001
            outcome = "OOM" if is_oom(exc) else "error"
            error = f"{type(exc).__name__}: {str(exc)[:160]}"
            failed_phase = probe.phase
        probe.finish()
        mp4_s = None
        if frames is not None and record and label.startswith("ours"):  # a property of the preset, timed once
            started = time.perf_counter()
            self.writer(frames, preset.fps, self.tmp / "bench.mp4", "bench")
            mp4_s = time.perf_counter() - started
        if not record:
            if outcome != "ok":
                log.warning("warm-up of %s %s/%s: %s", label, preset.name, rung, error)
            return
        steps = probe.steps
        host = probe.host.as_record()
        load_host = getattr(self, "load_host", {}) or {}
        host_peak = max(filter(None, [host["peak_must_hold_gib"], load_host.get("peak_must_hold_gib")]), default=None)
        file_peak = max(filter(None, [host["peak_file_gib"], load_host.get("peak_file_gib")]), default=None)
        streamed = self.block_bytes if memory.get("dit_from_disk") else 0
        step_s = round(sum(steps[1:]) / len(steps[1:]), 3) if len(steps) > 1 else None
        read = [b for b in probe.step_read_bytes[1:] if b is not None]
        row = {
            "config": label, "preset": preset.name, "rung": rung, "memory": memory, "result": outcome,
            "error": error, "failed_phase": failed_phase,
            "load_s": None if load_s is None else round(load_s, 1),
            "text_encoder_s": round(probe.seconds.get("text encoding", 0.0), 3),
            "steps_s": [round(s, 3) for s in steps],
            "step_s": round(sum(steps[1:]) / len(steps[1:]), 3) if len(steps) > 1 else None,
            "decode_s": round(probe.seconds.get("VAE decode", 0.0), 3),
            "mp4_s": None if mp4_s is None else round(mp4_s, 3),
            "total_s": round(sum(probe.seconds.values()) + (mp4_s or 0.0), 3),
            "reserved_peak_gib": {k: round(v, 3) for k, v in probe.reserved_peak.items()},
            "nvml_peak_gib": {k: round(v, 3) for k, v in probe.nvml_peak.items()},
            "peak_reserved_gib": round(max(probe.reserved_peak.values(), default=0.0), 3),
            "peak_nvml_gib": round(max(probe.nvml_peak.values(), default=0.0), 3),
            "fixes": fixes,
            "kernels": kernels_used(model),
            "frames_sha256": None if frames is None else frames_hash(frames),
            "host_peak_gib": host_peak,  # must-hold, the build's load included
            "host_file_gib": file_peak,
            "host_load_gib": load_host.get("peak_must_hold_gib"),
            "host_by_phase_gib": {"load": {"must_hold_gib": load_host.get("peak_must_hold_gib"),
                                           "file_gib": load_host.get("peak_file_gib")}, **host["per_phase"]},
            **streaming_columns(streamed, step_s, read),
            "cold_cache": cold,
        }
        log.info("%s %s/%s: %s step %.2fs peak %.2f GiB", label, preset.name, rung, outcome,
                 row["step_s"] or -1, row["peak_reserved_gib"])
        self.results.append(row)

    probe_cls = PhaseProbe

    def generate(self, model: Any, spec: Any, probe: PhaseProbe, record: bool) -> Any:
        """One measured call (bench.profile wraps it in torch.profiler)."""
        return model.generate(spec, probe.hooks())

    def _flush(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = environment(self.torch, self.args)
        stem = f"{meta['date']}-{meta['gpu'].replace(' ', '_')}"
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": self.results}, indent=2))
        (out / f"{stem}.md").write_text(markdown(meta, self.results))
        (out / "latest.json").write_text(json.dumps(latest_runs(meta, self.results), indent=2))


def kernels_used(model: Any) -> dict[str, Any]:
    """The kernels a run used: the attention choice per shape (or LightX2V's configured kernel where
    our selector is off) and the details of the kernel hooks that were applied."""
    selector = getattr(model, "attention_selector", None)
    applied = getattr(getattr(model, "compat", None), "applied", [])
    details = {fix.name: fix.detail for fix in applied
               if fix.name in ("attention_chosen_by_measurement", "int8_gemm_tiles_for_this_gpu",
                               "sage_attention_on_sm89_sm120")}
    if selector is not None:
        attention: Any = [{"shape": c["shape"], "backend": c["backend"], "source": c["source"]}
                          for c in selector.summary()]
    else:
        attention = f"{getattr(model, 'build', {}).get('attn_mode')} (LightX2V's)"
    return {"attention": attention, "int8_gemm": details.get("int8_gemm_tiles_for_this_gpu", "LightX2V's autotune list"),
            **({"sage_fix": details["sage_attention_on_sm89_sm120"]} if "sage_attention_on_sm89_sm120" in details else {})}


def latest_runs(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """docs/benchmarks/latest.json: one entry per measured run; s_per_step is the mean of steps 2-4."""
    out = []
    for r in rows:
        if "preset" not in r:
            continue
        steps = r.get("steps_s") or []
        out.append({"gpu": meta["gpu"], "date": meta["date"], "config": r["config"], "preset": r["preset"],
                    "rung": r.get("rung"), "result": r.get("result"),
                    "s_per_step": round(sum(steps[1:4]) / len(steps[1:4]), 3) if len(steps) > 1 else None,
                    "step1_s": steps[0] if steps else None, "peak_reserved_gib": r.get("peak_reserved_gib"),
                    # Host memory: must-hold peak (anonymous + pinned, load included) and the
                    # file-backed pages of mapped weights beside it.
                    "host_peak_gib": r.get("host_peak_gib"), "host_file_gib": r.get("host_file_gib"),
                    "kernels": r.get("kernels"), "frames_sha256": r.get("frames_sha256")})
    return out


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop the clean cached pages of `paths` (the next read goes to storage).
    Pages still mapped by a live mmap stay; LightX2V's streamed load opens and closes each block file
    per read, so between steps none is mapped."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def streaming_columns(streamed_bytes: int, step_s: float | None, read_bytes: list[int]) -> dict[str, Any]:
    """What reading the DiT from disk costs per step, measured and by formula for other disks."""
    out: dict[str, Any] = {"stream_gb_per_step": round(streamed_bytes / 1e9, 3),
                           "disk_read_gb_per_step": round(sum(read_bytes) / len(read_bytes) / 1e9, 3)
                           if read_bytes else None}
    for disk, rate in DISK_RATES_BPS.items():
        floor = streamed_bytes / rate
        out[f"step_s_{disk}"] = None if not streamed_bytes else round(max(step_s or 0.0, floor), 2)
    return out


def frames_hash(frames: Any) -> str:
    """First 16 hex digits of the SHA-256 of the uint8 frames (read in place: 220 MB at 720p)."""
    data = frames if frames.flags.c_contiguous else frames.copy()
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()[:16]


def environment(torch: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.backends.lightx2v import LightX2VBackend

    describe = LightX2VBackend(args.ckpt or ".").describe()
    return {"date": dt.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
            "budget_gib": args.budget_gib, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": describe["triton"], "sageattention": describe["sageattention"],
            "lightx2v_commit": describe["lightx2v_commit"], "quant_scheme": describe["quant_scheme"],
            "attn_mode": describe["attn_mode"], "platform": platform.platform(),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "prompt": PROMPT, "seed": SEED,
            # opt-in changes (lightx2v_compat.OPT_IN_NAMES) run only where this names them
            "opt_in_changes": os.environ.get(OPT_IN_ENV, ""),
            "checkpoint": "synthetic full-size (random weights: timings and memory real, pixels noise)"}


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Benchmark {meta['date']} on {meta['gpu']}", "",
             f"PyTorch capped at {meta['budget_gib']} GiB (except the `*-resident` configs); torch {meta['torch']} (CUDA "
             f"{meta['cuda']}), triton {meta['triton']}, sageattention {meta['sageattention']}, LightX2V "
             f"{meta['lightx2v_commit']}, {meta['quant_scheme']} + {meta['attn_mode']}, "
             f"`PYTORCH_CUDA_ALLOC_CONF={meta['alloc_conf']}`. {meta['checkpoint']}. Written by `python -m bench.run`.",
             "", "s/step: mean of steps 2-4 (step 1 in its own column). Peaks: torch max reserved / NVML above the "
             "level before the run, GiB, over the whole run; `DiT` and `decode` give the reserved peak of those phases.", "",
             "Host: must-hold peak GiB (anonymous + pinned, load included) / file-backed GiB (mapped weights the "
             "kernel can drop). Streamed: GB read from the block files per step (low-RAM rung); NVMe / SATA: the "
             "step time those disks allow, max(s/step, GB / 3 GB/s) and max(s/step, GB / 0.5 GB/s); a rung marked "
             "`cold page cache` read its blocks from this machine's disk at every step (`--cold-cache`).", "",
             "| config | preset | rung | result | load s | text enc s | step 1 s | s/step | decode s | mp4 s | total s | "
             "peak reserved | DiT | decode | NVML peak | host | host file | streamed GB | NVMe s/step | SATA s/step | frames |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "preset" not in r:
            lines.append(f"| {r['config']} | | | {r['result']} | | | | | | | | | | | | | | | | | |")
            continue
        steps = r["steps_s"]
        peaks = r["reserved_peak_gib"]
        lines.append("| {config} | {preset} | {rung} | {result} | {load} | {te} | {s1} | {ss} | {dec} | {mp4} | {tot} | "
                     "{pr} | {dit} | {vae} | {nv} | {host} | {hfile} | {gb} | {nvme} | {sata} | {sha} |".format(
                         config=r["config"], preset=r["preset"],
                         rung=r["rung"] + (" (cold page cache)" if r.get("cold_cache") else ""),
                         result=r["result"] + (f" ({r['failed_phase']})" if r.get("failed_phase") else ""),
                         load=r["load_s"] or "", te=r["text_encoder_s"], s1=steps[0] if steps else "",
                         ss=r["step_s"] or "", dec=r["decode_s"], mp4=r["mp4_s"] or "", tot=r["total_s"],
                         pr=r["peak_reserved_gib"], dit=peaks.get("denoising", ""), vae=peaks.get("VAE decode", ""),
                         nv=r["peak_nvml_gib"], host=_blank(r.get("host_peak_gib")),
                         hfile=_blank(r.get("host_file_gib")), gb=_blank(r.get("stream_gb_per_step") or None),
                         nvme=_blank(r.get("step_s_nvme")), sata=_blank(r.get("step_s_sata")),
                         sha=r.get("frames_sha256") or ""))
    return "\n".join(lines) + "\n"


def _blank(value: Any) -> Any:
    return "" if value is None else value


# `ours` and `ours` without one optimisation: LightX2VBackend keyword arguments.
OURS_VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ours-nochunk": {"ffn_chunk_tokens": 0},
    "ours-perstep": {"compat_skip": {"non_block_weights_kept_for_the_run"}},
    "ours-noattn": {"compat_skip": {"attention_chosen_by_measurement"}},
    "ours-nogemm": {"compat_skip": {"int8_gemm_tiles_for_this_gpu"}},
    "ours-nofuse": {"compat_skip": set(FUSION_NAMES)},
    "ours-hostsync": {"compat_skip": {"streamed_blocks_ordered_on_the_gpu"}},
}
KERNEL_SKIP = {"attention_chosen_by_measurement", "int8_gemm_tiles_for_this_gpu", *FUSION_NAMES}
# LightX2V as it ships: only the fixes it needs to run (bug 5's fix and every optimisation off).
PEER_SKIP = {"t5_token_embedding_on_host", "non_block_weights_kept_for_the_run",
             "streamed_blocks_ordered_on_the_gpu"} | KERNEL_SKIP
RESIDENT_KWARGS = {"resident": True, "ffn_chunk_tokens": 0}
ALIASES = {"peer": "lightx2v-recipe", "resident": "lightx2v-resident"}


def build_parser(prog: str, description: str, default_configs: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--ckpt", type=Path, default=None, help="full-size synthetic checkpoint (else written to a temp dir)")
    parser.add_argument("--budget-gib", type=float, default=11.0)
    parser.add_argument("--configs", default=default_configs,
                        help="comma list of ours, lightx2v-recipe, lightx2v-resident, ours-resident, "
                             + ", ".join(sorted(set(OURS_VARIANTS) - {"ours"})))
    parser.add_argument("--presets", default="", help="comma list of preset names (default: all)")
    parser.add_argument("--rungs", default="", help="comma list of rung names for `ours` (default: all; "
                        "`low-ram` alone measures the low-RAM rung of every preset)")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="stop starting new runs after this long")
    parser.add_argument("--cold-cache", action="store_true",
                        help="low-RAM rows: drop the DiT block files from the page cache before every step, so "
                             "each step reads them from this machine's disk")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m bench.run", __doc__.split("\n\n")[0], "ours,lightx2v-recipe,lightx2v-resident")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bench = prepare(args, Bench)
    for config in [ALIASES.get(c, c) for c in args.configs.split(",") if c]:
        planned = plan(config, bench, args)
        if planned is None:
            parser.error(f"unknown config {config!r}")
        bench.run_config(*planned)
    bench._flush()
    sys.stdout.write(markdown(environment(bench.torch, args), bench.results) + "\n")
    return 0


PEER_MEMORY = {"offload_granularity": "block", "text_encoder": "offload", "vae_offload": False,
               "vae_tiling": False, "rope_chunk": 0, "clean_cuda_cache": False}


def prepare(args: argparse.Namespace, bench_cls: type) -> Any:
    """Check the allocator setting, write a synthetic checkpoint unless --ckpt names one, build the bench."""
    alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower()
    if "expandable_segments:false" in alloc_conf:
        log.info("measuring without expandable segments (PYTORCH_CUDA_ALLOC_CONF=%s)", alloc_conf)
    elif "expandable_segments:true" not in alloc_conf:
        log.warning("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is not exported: the backend switches "
                    "it on after CUDA starts, which is not how the app runs")
    if args.ckpt is None:
        from tools.synthetic_checkpoint import write_checkpoint

        args.ckpt = write_checkpoint(Path(tempfile.mkdtemp(prefix="bench-ckpt-")), "full").root
    return bench_cls(args, args.ckpt)


def plan(config: str, bench: Any, args: argparse.Namespace, first_rung_only: bool = False
         ) -> tuple[str, dict[str, Any], list[tuple[Any, str, dict[str, Any]]], float | None] | None:
    """run_config's arguments for one configuration: (label, backend kwargs, runs, cap), or None
    for an unknown name. `first_rung_only`: `ours` runs each preset's first rung only (the profile)."""
    wanted = set(filter(None, args.presets.split(",")))
    presets = [p for name, p in bench.presets.items() if not wanted or name in wanted]
    rung_filter = set(filter(None, args.rungs.split(",")))
    if config in OURS_VARIANTS:
        runs = [(p, r.name, r.settings()) for p in presets
                for r in (p.rungs[:1] if first_rung_only and not rung_filter else p.rungs)
                if not rung_filter or r.name in rung_filter]
        runs.sort(key=lambda run: sorted(build_settings(run[2]).items()))  # one load per build
        return config, OURS_VARIANTS[config], runs, args.budget_gib
    if config == "lightx2v-recipe":
        return (config, {"compat_skip": PEER_SKIP, "ffn_chunk_tokens": 0},
                [(p, "recipe", PEER_MEMORY) for p in presets], args.budget_gib)
    if config in ("lightx2v-resident", "ours-resident"):
        resident = dict(PEER_MEMORY, text_encoder="gpu")
        kwargs = dict(RESIDENT_KWARGS, compat_skip=KERNEL_SKIP if config == "lightx2v-resident" else set())
        return config, kwargs, [(p, "resident", resident) for p in presets], None
    return None


if __name__ == "__main__":
    sys.exit(main())

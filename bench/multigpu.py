"""The same presets on one GPU and on N GPUs in one call, through the app's GPU workers.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \\
    python -m bench.multigpu --ckpt DIR --gpus 0,1 [--presets 720x1280x81,480x832x81] [--budget-gib 11.0]

Every worker process is capped at --budget-gib (torch.cuda.set_per_process_memory_fraction on its
card), the rung is each preset's first (`fast` / `chunked-rope`), and the attention kernel is the
same forced one in every configuration (--attention, default LightX2V's sage_attn2), so that the
only difference between rows is the number of GPUs. Configurations, in this order:

  ours-1gpu        one lane worker on the first GPU of --gpus (the reference of this call)
  ours-Ngpu-seq    one sequence-parallel group over all of --gpus (Ulysses, seq_p_size N)
  ours-Ngpu-lanes  N lanes through the app's job queue and services (mp4 encode, record and history
                   included): one clip alone, then N clips submitted together, on --lanes-presets;
                   the row has both times and their ratio (`together_vs_one`, target about 1) and
                   per clip the time until its encode started and the encode's own time. Alone:
                   `--configs lanes`

Each row has the s/step (mean of steps 2-4, timed where rank 0's step events arrive), the peak
reserved memory of every GPU (`per_gpu_peak_reserved_gib`), a hash of the frames, and for seq the
relative L2 distance of its final latents (the DiT output) to the one-GPU run's. Rows go to
<out>/multigpu-<date>-<gpu>.json and are merged into <out>/latest.json (same fields as bench.run's
rows; a row of the same config and preset is replaced).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import PROMPT, SEED, frames_hash

log = logging.getLogger("bench.multigpu")


class _Probe:
    """RunHooks for one run through a worker group: step times and the final latents."""

    def __init__(self) -> None:
        from pipeline.backend import RunHooks

        self.steps: list[float] = []
        self.latents: Any = None
        self._last = time.perf_counter()
        self.started = self._last
        self.hooks = RunHooks(on_phase=self._phase, on_step=self._step, should_stop=lambda: False,
                              on_latents=self._keep)

    def _phase(self, phase: Any) -> None:
        if phase.value == "denoising":
            self._last = time.perf_counter()

    def _step(self, index: int, total: int) -> None:
        now = time.perf_counter()
        self.steps.append(now - self._last)
        self._last = now

    def _keep(self, latents: Any) -> None:
        self.latents = latents


def _spec(preset: Any, rung: Any):
    from pipeline.types import RunSpec

    return RunSpec(preset=preset.name, rung=rung.name, prompt=PROMPT, negative_prompt="", seed=SEED,
                   height=preset.height, width=preset.width, frames=preset.frames, steps=preset.steps,
                   shift=preset.shift, guidance=preset.guidance, memory=rung.settings(), preview=None)


def _backend(group: Any) -> Any:
    from pipeline.workers.child import build_backend
    from pipeline.workers.group import RemoteBackend

    return RemoteBackend(group, build_backend(group.backend_spec, 0))


def _spec_for(args: argparse.Namespace, seq: int):
    from pipeline.workers.protocol import BackendSpec

    if args.backend == "fake":
        return BackendSpec("fake", {})
    return BackendSpec("lightx2v", {"weights_dir": str(args.ckpt), "vram_cap_gib": args.budget_gib,
                                    "attention": args.attention, "seq_parallel": seq})


def _run(group: Any, preset: Any, rung: Any, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    backend = _backend(group)
    key = backend.load_key(rung.settings())
    started = time.perf_counter()
    model = backend.load(key, lambda phase: None)
    load_s = time.perf_counter() - started
    if args.warmup:
        from dataclasses import replace

        model.generate(_spec(replace(preset, name="warmup", height=256, width=448, frames=9), rung), _Probe().hooks)
    group.reset_peak()
    probe = _Probe()
    outcome, error, frames = "ok", None, None
    try:
        frames = model.generate(_spec(preset, rung), probe.hooks)
    except Exception as exc:  # noqa: BLE001 - a row says what failed
        from pipeline.machine.gpu import is_oom

        outcome, error = ("OOM" if is_oom(exc) else "error"), f"{type(exc).__name__}: {str(exc)[:200]}"
        model.recover()
    steps = probe.steps
    row = {"preset": preset.name, "rung": rung.name, "result": outcome, "error": error,
           "load_s": round(load_s, 1), "steps_s": [round(s, 3) for s in steps],
           "step_s": round(sum(steps[1:4]) / len(steps[1:4]), 3) if len(steps) > 1 else None,
           "total_s": round(time.perf_counter() - probe.started, 3),
           "per_gpu_peak_reserved_gib": group.per_gpu_peaks(),
           "peak_reserved_gib": group.peak_reserved_gib(),
           "gpu_indices": list(group.gpus),
           "frames_sha256": None if frames is None else frames_hash(frames),
           "kernels": (group.last_describe or {}).get("kernels")}
    return row, probe.latents


def _rel_l2(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    import torch

    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return round(float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)), 6)


def _identical(a: Any, b: Any) -> bool | None:
    """Bit for bit (a relative L2 rounded to 6 digits cannot tell)."""
    if a is None or b is None:
        return None
    import torch

    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multigpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="synthetic checkpoint (tools/synthetic_checkpoint.py)")
    parser.add_argument("--gpus", default="0,1")
    parser.add_argument("--presets", default="720x1280x81,480x832x81")
    parser.add_argument("--budget-gib", type=float, default=11.0)
    parser.add_argument("--attention", default="sage_attn2", help="the attention kernel of every configuration")
    parser.add_argument("--lanes-presets", default="480x832x49",
                        help="presets of the lanes rows (two clips at once against one)")
    parser.add_argument("--configs", default="1gpu,seq,lanes")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--backend", choices=("lightx2v", "fake"), default="lightx2v",
                        help="fake: the CPU test double (the bench's own test; its times mean nothing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pipeline.machine.gpu import GpuMonitor, device_count
    from pipeline.workers.group import WorkerGroup, check_mode, parse_gpus
    from presets import load_presets

    gpus = parse_gpus(args.gpus, device_count())
    n = len(gpus)
    configs = set(args.configs.split(","))
    if "seq" in configs:
        check_mode("seq", gpus)
    presets = load_presets()
    chosen = [presets[name] for name in args.presets.split(",") if name]
    gpu_name = (GpuMonitor(device_index=gpus[0]).facts() or {}).get("name", "GPU")
    rows: list[dict[str, Any]] = []
    reference: dict[str, tuple[dict[str, Any], Any]] = {}

    def run_group(label: str, group: WorkerGroup) -> None:
        group.start()
        try:
            group.wait_ready(600)
            for preset in chosen:
                row, latents = _run(group, preset, preset.rungs[0], args)
                row["config"] = label
                if label.endswith("-seq") and preset.name in reference:
                    ref_row, ref_latents = reference[preset.name]
                    row["latents_rel_l2_vs_1gpu"] = _rel_l2(latents, ref_latents)
                    row["latents_identical_1gpu"] = _identical(latents, ref_latents)
                    row["frames_equal_1gpu"] = row["frames_sha256"] == ref_row["frames_sha256"]
                    if row["step_s"] and ref_row["step_s"]:
                        row["speedup_vs_1gpu"] = round(ref_row["step_s"] / row["step_s"], 3)
                if label == "ours-1gpu":
                    reference[preset.name] = (row, latents)
                log.info("%s %s: %s", label, preset.name, row)
                rows.append(row)
        finally:
            group.close()

    # Written after each configuration: a run cut short by a time limit keeps what it measured.
    if "1gpu" in configs:
        run_group("ours-1gpu", WorkerGroup(_spec_for(args, 1), gpus[:1]))
        _write(args, gpu_name, rows)
    if "seq" in configs:
        run_group(f"ours-{n}gpu-seq", WorkerGroup(_spec_for(args, n), gpus, seq=True))
        _write(args, gpu_name, rows)
    if "lanes" in configs:
        rows.extend(_lanes(args, gpus, presets, [presets[n] for n in args.lanes_presets.split(",") if n]))
        _write(args, gpu_name, rows)
    sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    return 0


def _lanes(args: argparse.Namespace, gpus: tuple[int, ...], presets: Any, chosen: list[Any]) -> list[dict[str, Any]]:
    """Through the app's own path (the job queue dispatching to one service per lane: plan, run in
    the lane's worker, frames back, mp4 encode, record, history), as a user's clicks: every lane
    loads and runs once (submitted together), then one clip alone, then one clip per lane submitted
    together. Times are from submit to the last job's end, host work (mp4 encode) included."""
    import tempfile

    from pipeline.jobs import JobQueue
    from pipeline.store.history import History
    from pipeline.store.outputs import OutputStore
    from pipeline.types import GenerationRequest
    from pipeline.workers.setup import multi_gpu_services

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lanes-") as tmp:
        outputs = OutputStore(Path(tmp) / "outputs")
        outputs.ensure()
        history = History(Path(tmp) / "outputs" / "history.sqlite3")
        services, groups = multi_gpu_services(mode="lanes", gpus=gpus, backend_spec=_spec_for(args, 1),
                                              presets=presets, outputs=outputs, history=history,
                                              vram_cap_gib=args.budget_gib)
        queue = JobQueue(services[0], lanes=services)
        try:
            for group in groups:
                group.wait_ready(600)
            seeds = iter(range(SEED, SEED + 10_000))

            def clips(preset: Any, count: int) -> tuple[float, list[Any]]:
                started = time.perf_counter()
                jobs = queue.submit_all([GenerationRequest(prompt=PROMPT, preset=preset.name, seed=next(seeds))
                                         for _ in range(count)])
                for job in jobs:
                    job.done.wait()
                return time.perf_counter() - started, jobs

            for preset in chosen:
                clips(preset, len(groups))  # loads, and each lane's first run of this shape
                one_s, (alone,) = clips(preset, 1)
                together_s, jobs = clips(preset, len(groups))
                rows.append(_lanes_row(len(gpus), preset, one_s, alone, together_s, jobs))
                log.info("lanes %s: %s", preset.name, rows[-1])
        finally:
            queue.shutdown()
            for group in groups:
                group.close()
    return rows


def _lanes_row(n: int, preset: Any, one_s: float, alone: Any, together_s: float, jobs: list[Any]) -> dict[str, Any]:
    def clip(job: Any) -> dict[str, Any]:
        if job.error is not None:
            return {"lane": job.lane, "error": f"{type(job.error).__name__}: {str(job.error)[:200]}"}
        record = job.result.record
        timings = record.get("timings_s") or {}
        # "total" ends where the encode starts: the GPU worker's part and the frames' way back.
        return {"lane": job.lane, "rung": record.get("rung_used"), "until_encode_s": timings.get("total"),
                "writing_mp4_s": timings.get("writing mp4"), "steps_s": timings.get("steps"),
                "peak_reserved_gib": (record.get("gpus") or {}).get("per_gpu_peak_reserved_gib", [None])[0]}

    lanes = [clip(job) for job in jobs]
    first = clip(alone)
    failed = [c["error"] for c in [first, *lanes] if "error" in c]
    steps = first.get("steps_s") or []
    return {"config": f"ours-{n}gpu-lanes", "preset": preset.name, "rung": first.get("rung"),
            "result": "error" if failed else "ok", "error": failed[0] if failed else None,
            "steps_s": steps, "step_s": round(sum(steps[1:4]) / len(steps[1:4]), 3) if len(steps) > 1 else None,
            "one_clip_s": round(one_s, 3), "clips_together": len(jobs), "together_s": round(together_s, 3),
            "together_vs_one": round(together_s / one_s, 3), "alone": first, "lanes": lanes,
            "lane_indices": sorted(c["lane"] for c in lanes if c["lane"] is not None),
            "peak_reserved_gib": first.get("peak_reserved_gib"),
            "per_gpu_peak_reserved_gib": [c.get("peak_reserved_gib") for c in sorted(lanes, key=lambda c: c["lane"] or 0)]}


def _write(args: argparse.Namespace, gpu_name: str, rows: list[dict[str, Any]]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = dt.date.today().isoformat()
    (out / f"multigpu-{date}-{gpu_name.replace(' ', '_')}.json").write_text(
        json.dumps({"meta": {"date": date, "gpu": gpu_name, "gpus": args.gpus, "budget_gib": args.budget_gib,
                             "attention": args.attention, "prompt": PROMPT, "seed": SEED,
                             "checkpoint": str(args.ckpt)}, "runs": rows}, indent=2))
    latest_path = out / "latest.json"
    latest = json.loads(latest_path.read_text()) if latest_path.is_file() else []
    new = []
    for r in rows:
        steps = r.get("steps_s") or []
        new.append({"gpu": gpu_name, "date": date, "config": r["config"], "preset": r["preset"], "rung": r["rung"],
                    "result": r["result"], "s_per_step": r.get("step_s"), "step1_s": steps[0] if steps else None,
                    "peak_reserved_gib": r.get("peak_reserved_gib"),
                    "per_gpu_peak_reserved_gib": r.get("per_gpu_peak_reserved_gib"),
                    "kernels": r.get("kernels"), "frames_sha256": r.get("frames_sha256"),
                    **{k: r[k] for k in ("speedup_vs_1gpu", "latents_rel_l2_vs_1gpu", "frames_equal_1gpu",
                                         "one_clip_s", "together_s", "together_vs_one", "clips_together",
                                         "lane_indices") if k in r},
                    "command": "python -m bench.multigpu " + " ".join(sys.argv[1:])})
    replaced = {(r["config"], r["preset"]) for r in new}
    latest = [r for r in latest if (r.get("config"), r.get("preset")) not in replaced] + new
    latest_path.write_text(json.dumps(latest, indent=2))


if __name__ == "__main__":
    sys.exit(main())

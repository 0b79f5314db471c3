"""Host memory of one build, load included, in a process of its own (issue 15).

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m bench.host_memory --ckpt DIR \
        --preset 480x832x81 --rung low-ram [--out docs/benchmarks]

`bench.run` measures host memory too, but several builds in one process; this runs exactly one,
so nothing an earlier build left (torch's pinned-block cache, a reference still held) counts. A
thread samples /proc/self/status and torch's pinned bytes every 0.25 s through the load and one
run, and keeps the peak of each part per phase: RssAnon, RssShmem, RssFile, pinned, and the
must-hold and file-backed figures the app records (`pipeline.machine.hostmem`). Writes
<out>/<date>-<gpu>-host-<preset>-<rung>.json and logs one line per phase.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.host_memory")
GIB = 1024**3
PROMPT = "A red fox runs through fresh snow at dawn."
SEED = 3
class PhasePeaks:
    """Peaks of every part per phase, sampled on a thread until `stop()`."""

    def __init__(self, interval_s: float = 0.25):
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="host-sampler")

    def start(self) -> "PhasePeaks":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        from pipeline.machine import hostmem

        process = hostmem.read_process(hostmem.device_mapped_bytes())
        if process is None:
            return
        reading = {"RssAnon": process.anon_bytes, "RssShmem": process.shmem_bytes, "RssFile": process.file_bytes,
                   "pinned": process.pinned_bytes or 0, "must_hold": process.must_hold_bytes,
                   "file_backed": process.reclaimable_bytes}
        slot = self.peaks.setdefault(self.phase, {})
        for key, value in reading.items():
            slot[key] = max(slot.get(key, 0), value)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def as_gib(self) -> dict[str, dict[str, float]]:
        return {phase: {k: round(v / GIB, 2) for k, v in parts.items()} for phase, parts in self.peaks.items()}


def measure(ckpt: Path, preset_name: str, rung_name: str, cap_gib: float) -> dict[str, Any]:
    from presets import load_presets
    from pipeline.backend import RunHooks
    from pipeline.backends.lightx2v import LightX2VBackend
    from pipeline.cache import PipelineCache
    from pipeline.types import RunSpec

    preset = load_presets()[preset_name]
    memory = preset.rung(rung_name).settings()
    peaks = PhasePeaks().start()
    try:
        peaks.phase = "load"
        started = time.perf_counter()
        cache = PipelineCache(LightX2VBackend(ckpt, vram_cap_gib=cap_gib))
        model = cache.get(cache.backend.load_key(memory))
        load_s = time.perf_counter() - started
        spec = RunSpec(preset=preset.name, rung=rung_name, prompt=PROMPT, negative_prompt="", seed=SEED,
                       height=preset.height, width=preset.width, frames=preset.frames, steps=preset.steps,
                       shift=preset.shift, guidance=preset.guidance, memory=memory, preview=None)
        started = time.perf_counter()
        model.generate(spec, RunHooks(on_phase=lambda phase: setattr(peaks, "phase", f"run: {phase.value}"),
                                      on_step=lambda i, n: None, should_stop=lambda: False))
        run_s = time.perf_counter() - started
        peaks.phase = "after the run"
        peaks.sample()
        cache.release()
        peaks.phase = "after release"
        time.sleep(0.5)
        peaks.sample()
    finally:
        peaks.stop()
    by_phase = peaks.as_gib()
    return {"preset": preset_name, "rung": rung_name, "load_s": round(load_s, 1), "run_s": round(run_s, 1),
            "must_hold_peak_gib": max(p.get("must_hold", 0.0) for p in by_phase.values()),
            "by_phase_gib": by_phase}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a full-size synthetic (or real) checkpoint folder")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--rung", required=True)
    parser.add_argument("--cap-gib", type=float, default=11.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    result = measure(args.ckpt, args.preset, args.rung, args.cap_gib)
    result.update(gpu=torch.cuda.get_device_name(0), date=dt.date.today().isoformat(),
                  command="python -m bench.host_memory " + " ".join(argv if argv is not None else sys.argv[1:]))
    for phase, parts in result["by_phase_gib"].items():
        log.info("%-22s %s", phase, parts)
    log.info("must-hold peak, load included: %.2f GiB", result["must_hold_peak_gib"])
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{result['date']}-{result['gpu'].replace(' ', '_')}-host-{args.preset}-{args.rung}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

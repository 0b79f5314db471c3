"""Which of our run-time changes moves the frames? One load, one shape, every switch, one table.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m bench.frames_bisect --ckpt DIR \
        [--shape 480x832x49] [--seed 11] [--out docs/benchmarks]

On a CUDA machine with LightX2V importable. It builds the `fast` rung once (PyTorch capped at 11.0
GiB, like the app) and runs the same prompt and seed:
  1. twice as the app runs it (everything on): are two identical runs identical?
  2. without the per-step preview;
  3. once with each applied compat change undone in turn (`CompatFixes.disabled`: only the ones
     that can be undone on a built pipeline; build-time ones are listed as such);
then, on a second build with SageAttention forced instead of the measured kernel, once more.
Each row is a hash of the uint8 frames; a row that differs from the first names the switch that
changes the arithmetic. Pure re-orderings and memory moves must leave every hash equal; the
attention choice is the one expected to differ (another kernel). Writes
<out>/<date>-<gpu>-frames-bisect.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.run import PROMPT, frames_hash

log = logging.getLogger("bench.frames_bisect")
FAST = {"offload_granularity": "block", "text_encoder": "offload", "vae_offload": False,
        "vae_tiling": False, "rope_chunk": 0, "clean_cuda_cache": False}


def _spec(shape: str, seed: int) -> Any:
    from pipeline.types import RunSpec

    height, width, frames = (int(x) for x in shape.split("x"))
    return RunSpec(preset=shape, rung="bisect", prompt=PROMPT, negative_prompt="", seed=seed, height=height,
                   width=width, frames=frames, steps=4, shift=5.0, guidance=1.0, memory=dict(FAST))


def _hooks() -> Any:
    from pipeline.backend import RunHooks

    return RunHooks(on_phase=lambda phase: None, on_step=lambda i, n: None, should_stop=lambda: False)


def _load(ckpt: Path, cap_gib: float, **kwargs: Any) -> Any:
    from pipeline.backends.lightx2v import LightX2VBackend
    from pipeline.cache import PipelineCache

    cache = PipelineCache(LightX2VBackend(ckpt, vram_cap_gib=cap_gib, **kwargs))
    return cache, cache.get(cache.backend.load_key(dict(FAST)))


def bisect(load: Any, spec: Any) -> dict[str, Any]:
    """`load(**backend_kwargs)` -> (cache, loaded model) of the fast rung; `spec` the run."""
    cache, model = load()
    rows: list[dict[str, Any]] = []

    def run(label: str, run_spec: Any = spec) -> None:
        try:
            rows.append({"run": label, "frames": frames_hash(model.generate(run_spec, _hooks()))})
        except Exception as exc:  # noqa: BLE001 - undoing a bug fix can break the run: that row says so
            rows.append({"run": label, "frames": None, "note": f"run failed: {type(exc).__name__}: {str(exc)[:160]}"})
        log.info("%-45s %s", label, rows[-1]["frames"] or rows[-1]["note"])

    run("everything on")
    run("everything on, again")
    run("no per-step preview", replace(spec, preview=None))
    for fix in list(model.compat.applied):
        if not fix.runtime and (fix.undo is None or fix.redo is None):
            rows.append({"run": f"without {fix.name}", "frames": None, "note": "acts at build time"})
            continue
        with model.compat.disabled(fix.name):
            run(f"without {fix.name}")
    attention = model.attention_selector.summary() if model.attention_selector is not None else []
    cache.release()
    cache, model = load(attention="sage_attn2")
    run("SageAttention forced (another build)")
    cache.release()
    first = rows[0]["frames"]
    for row in rows:
        row["same_as_first"] = None if row["frames"] is None else row["frames"] == first
    return {"shape": f"{spec.height}x{spec.width}x{spec.frames}", "seed": spec.seed,
            "attention_measured": attention, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frames_bisect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a synthetic (or real) checkpoint folder")
    parser.add_argument("--shape", default="480x832x49", help="HEIGHTxWIDTHxFRAMES")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cap-gib", type=float, default=11.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    result = bisect(lambda **kwargs: _load(args.ckpt, args.cap_gib, **kwargs), _spec(args.shape, args.seed))
    result.update(gpu=torch.cuda.get_device_name(0), date=dt.date.today().isoformat(),
                  command="python -m bench.frames_bisect " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['date']}-{result['gpu'].replace(' ', '_')}-frames-bisect.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(json.dumps(result["rows"], indent=1) + "\n")
    return 0 if all(r["same_as_first"] is not False for r in result["rows"][:-1]) else 1


if __name__ == "__main__":
    sys.exit(main())

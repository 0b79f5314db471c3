"""The one rule for where the INT8 model's files live under a weights folder (= LightX2V's `model_path`).

The doctor, the downloader and the backend all ask this module, so "complete" means the same thing to
each of them. It follows LightX2V's own lookups: its config merge (the model folder's config.json, then the
quantized checkpoint folder's over it) and its .pth search (the quantized folder first, then the root):

    config.json               optional, merged first (root)
    distill_int8/config.json  optional, merged over the root one; at least one of the two must exist
    distill_int8/block_{0..N-1}.safetensors, distill_int8/non_block.safetensors   N = merged num_layers
    models_t5_umt5-xxl-enc-int8.pth, Wan2.1_VAE.pth     in distill_int8/ or the root (first found wins)
    google/umt5-xxl/          tokenizer, at the root or under distill_int8/ (older LightX2V looked there)
    taew2_1.pth / lighttaew2_1.pth   optional tiny VAE, in distill_int8/ or the root

The rule is written over an `exists(relative_path)` predicate so it applies equally to a folder on disk
and to a repository listing. Standard library only: the doctor and the downloader import it without
the backend's packages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import WeightsError

DIT_DIR = "distill_int8"
TOKENIZER_DIR = "google/umt5-xxl"
T5_FILENAME = "models_t5_umt5-xxl-enc-int8.pth"
VAE_FILENAME = "Wan2.1_VAE.pth"
# LightX2V's default tiny-VAE name for Wan 2.1 first; LightX2V's own distilled variant after it.
TINY_VAE_NAMES = ("taew2_1.pth", "lighttaew2_1.pth")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "spiece.model")
# Merge order as LightX2V's set_config: the root config first, then the quantized checkpoint's over it.
CONFIG_PATHS = ("config.json", f"{DIT_DIR}/config.json")
# Keys LightX2V reads from the DiT config; without them loading fails much later.
CONFIG_KEYS_READ_BY_LOADER = ("dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "text_len")
SYNTHETIC_MARK = "SYNTHETIC CHECKPOINT"

Exists = Callable[[str], bool]


def pth_candidates(name: str) -> tuple[str, str]:
    """Where LightX2V looks for a .pth (its find_torch_model_path): the quantized folder, then the root."""
    return f"{DIT_DIR}/{name}", name


def first(exists: Exists, candidates: Iterable[str]) -> str | None:
    return next((rel for rel in candidates if exists(rel)), None)


def config_paths(exists: Exists) -> list[str]:
    """The config files present, in merge order."""
    return [rel for rel in CONFIG_PATHS if exists(rel)]


def tokenizer_files(exists: Exists) -> list[str]:
    """The tokenizer files of the first usable tokenizer folder (config plus a vocabulary), or []."""
    for folder in (TOKENIZER_DIR, f"{DIT_DIR}/{TOKENIZER_DIR}"):
        present = [f"{folder}/{n}" for n in TOKENIZER_FILES if exists(f"{folder}/{n}")]
        names = {p.rsplit("/", 1)[1] for p in present}
        if "tokenizer_config.json" in names and names & {"tokenizer.json", "spiece.model"}:
            return present
    return []


def tiny_vae(exists: Exists) -> str | None:
    return first(exists, (c for name in TINY_VAE_NAMES for c in pth_candidates(name)))


@dataclass(frozen=True)
class Resolution:
    """What the rule found among the paths `exists` knows: `files` to open, `missing` descriptions."""

    files: tuple[str, ...]
    missing: tuple[str, ...]
    t5: str | None
    vae: str | None
    tokenizer: tuple[str, ...]
    tiny_vae: str | None


def resolve(exists: Exists, num_layers: int) -> Resolution:
    """Apply the rule once the block count is known (from the merged config)."""
    files: list[str] = list(config_paths(exists))
    missing: list[str] = [] if files else [f"{DIT_DIR}/config.json (or config.json in the root)"]
    absent = []
    for rel in [f"{DIT_DIR}/block_{i}.safetensors" for i in range(num_layers)] + [f"{DIT_DIR}/non_block.safetensors"]:
        (files if exists(rel) else absent).append(rel)
    if absent:
        shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
        missing.append(f"{shown} ({len(absent)} DiT file(s))")
    found: dict[str, str | None] = {}
    for label, name in (("T5 text encoder", T5_FILENAME), ("VAE", VAE_FILENAME)):
        found[name] = first(exists, pth_candidates(name))
        if found[name] is None:
            missing.append(f"{name} (the {label}, in {DIT_DIR}/ or the root)")
        else:
            files.append(found[name])  # type: ignore[arg-type]
    tok = tokenizer_files(exists)
    if not tok:
        missing.append(f"{TOKENIZER_DIR}/ (the UMT5 tokenizer: tokenizer_config.json and tokenizer.json or "
                       "spiece.model)")
    files += tok
    return Resolution(tuple(files), tuple(missing), found[T5_FILENAME], found[VAE_FILENAME], tuple(tok),
                      tiny_vae(exists))


def config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with a merged DiT config, or None."""
    absent = [k for k in CONFIG_KEYS_READ_BY_LOADER if k not in config]
    if absent:
        return f"the merged config lacks keys the loader reads: {', '.join(absent)}"
    layers = config["num_layers"]
    if not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
        return f"num_layers is {layers!r}"
    return None


@dataclass(frozen=True)
class WeightsLayout:
    """Paths to hand to LightX2V, found by the rule above in a folder on disk."""

    root: Path
    dit_dir: Path
    config: dict[str, Any] = field(compare=False)
    config_paths: tuple[Path, ...]
    t5: Path
    vae: Path
    tokenizer: Path
    num_layers: int
    tiny_vae: Path | None  # optional: enables draft decode and better previews
    synthetic: bool


def read_config(root: Path) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """Merged config of a folder, the files it came from, and (file, problem) pairs for unreadable ones."""
    configs, used, problems = [], [], []
    for rel in config_paths(lambda r: (root / r).is_file()):
        try:
            data = json.loads((root / rel).read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append((rel, f"cannot be read ({exc.strerror or exc})"))
            continue
        except (UnicodeDecodeError, ValueError):
            problems.append((rel, "is not valid JSON (file is corrupt)"))
            continue
        if not isinstance(data, dict):
            problems.append((rel, "is not a JSON object (file is corrupt)"))
            continue
        configs.append(data)
        used.append(rel)
    return {key: value for config in configs for key, value in config.items()}, used, problems


def is_synthetic(root: Path) -> bool:
    """tools/synthetic_checkpoint.py marks its random-weight folders with this README."""
    try:
        return SYNTHETIC_MARK in (root / "README.txt").read_text(errors="replace")[:4096]
    except OSError:
        return False


def locate(root: Path | str) -> WeightsLayout:
    """The layout of `root`, or a WeightsError naming everything that is missing. Checks presence and the
    config only; file contents are the weights manager's `verify`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WeightsError(f"The weights folder {root} does not exist. Download the model into it first "
                           "(python app.py download).")
    config, used, bad = read_config(root)
    if bad:
        rel, why = bad[0]
        raise WeightsError(f"{root / rel} {why}; download it again.")
    problem = config_problem(config) if used else None
    if problem:
        raise WeightsError(f"The model config in {root} is unusable: {problem}.")
    res = resolve(lambda r: (root / r).is_file(), int(config.get("num_layers") or 0))
    if res.missing:
        raise WeightsError(f"The model in {root} is incomplete; missing: {'; '.join(res.missing)}. "
                           "Download it again with python app.py download (it resumes).")
    assert res.t5 and res.vae and res.tokenizer  # resolve() reports them missing otherwise
    return WeightsLayout(root=root, dit_dir=root / DIT_DIR, config=config,
                         config_paths=tuple(root / r for r in used), t5=root / res.t5, vae=root / res.vae,
                         tokenizer=(root / res.tokenizer[0]).parent, num_layers=config["num_layers"],
                         tiny_vae=root / res.tiny_vae if res.tiny_vae else None, synthetic=is_synthetic(root))

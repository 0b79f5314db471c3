"""`verify`: is every file the INT8 path opens present and sound? The layout is the rule of
pipeline/backends/weights_layout.py; sizes and checksums come from the record the download writes (`.wan-studio/manifest.json`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from install.errors import WeightsCorrupt, WeightsIncomplete
from install.filecheck import hash_file, read_json, structure_problem
from install.progress import format_bytes
from pipeline.backends import weights_layout
from pipeline.errors import WeightsError

STATE_DIR = ".wan-studio"
MANIFEST_NAME = "manifest.json"





@dataclass(frozen=True)
class VerifyProblem:
    path: str  # relative to the weights folder
    kind: str  # "missing" | "corrupt" | "size" | "layout" | "unreadable"
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    weights_dir: Path
    problems: tuple[VerifyProblem, ...]
    files_checked: int
    bytes_checked: int
    used_manifest: bool
    deep: bool
    layout: weights_layout.WeightsLayout | None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(p.path for p in self.problems if p.kind == "missing")

    def summary(self, limit: int = 5) -> str:
        if self.ok:
            how = "checked against the Hub checksums" if self.deep and self.used_manifest else (
                "sizes checked against the download record" if self.used_manifest else "headers checked")
            return (f"All {self.files_checked} weight files are present in {self.weights_dir} "
                    f"({format_bytes(self.bytes_checked)}; {how}).")
        lines = [f"{len(self.problems)} problem(s) with the weights in {self.weights_dir}:"]
        lines += [f"- {p.path}: {p.detail}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"- ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """For the loader: a clear WeightsError instead of a LightX2V traceback halfway through loading."""
        if self.ok:
            return
        fix = "Run python app.py download (or Download weights in the System tab); it fetches only what is " \
              "missing or damaged."
        kind = WeightsIncomplete if all(p.kind == "missing" for p in self.problems) else WeightsCorrupt
        raise kind(f"{self.summary()}\n{fix}")


def read_manifest(root: Path) -> dict[str, Any] | None:
    data, err = read_json(root / STATE_DIR / MANIFEST_NAME)
    return data if err is None and isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify(weights_dir: Path | str, *, deep: bool = False) -> VerifyReport:
    """Check that every file the INT8 path opens is present and sound. Never raises.

    Quick (default, seconds): the layout rule, sizes from the download record, safetensors headers, torch
    zip directories, JSON. `deep`: also hashes every recorded file against the Hub checksum (reads ~22 GB),
    or CRC-checks the .pth members of a folder without a record.
    """
    root = Path(weights_dir).expanduser()
    problems: list[VerifyProblem] = []
    checked: list[tuple[str, int]] = []
    found = None
    try:
        if not root.is_dir():
            problems.append(VerifyProblem(".", "missing", f"folder {root} does not exist"))
        elif root.name == weights_layout.DIT_DIR and (root / "non_block.safetensors").exists():
            problems.append(VerifyProblem(".", "layout", f"this is the {weights_layout.DIT_DIR} folder itself; point "
                                                         f"the weights folder at its parent ({root.parent})"))
        else:
            found = _verify(root, deep, problems, checked)
    except OSError as exc:  # a folder we may not list; per-file read errors are reported per file
        problems.append(VerifyProblem(".", "unreadable", f"cannot be read ({exc.strerror or exc})"))
    return VerifyReport(root, tuple(problems), len(checked), sum(s for _, s in checked), read_manifest(root) is not None
                        if root.is_dir() else False, deep, found if not problems else None)


def _verify(root: Path, deep: bool, problems: list[VerifyProblem], checked: list[tuple[str, int]]
            ) -> weights_layout.WeightsLayout | None:
    manifest = read_manifest(root)
    recorded: dict[str, dict[str, Any]] = manifest["files"] if manifest else {}
    config, used, bad = weights_layout.read_config(root)
    problems += [VerifyProblem(rel, "corrupt", why) for rel, why in bad]
    if used and (err := weights_layout.config_problem(config)):
        problems.append(VerifyProblem(used[-1], "corrupt", err))
    layers = config.get("num_layers") if not problems else 0
    res = weights_layout.resolve(lambda r: (root / r).is_file(), layers if isinstance(layers, int) else 0)
    problems += [VerifyProblem(m.split(" ", 1)[0].rstrip(","), "missing", f"missing: {m}") for m in res.missing]
    for rel in dict.fromkeys([*res.files, *recorded]):  # an optional file is checked once we fetched it
        path, want = root / rel, recorded.get(rel, {})
        if not path.is_file():
            problems.append(VerifyProblem(rel, "missing", "missing (recorded by the download)"))
            continue
        size = path.stat().st_size
        if isinstance(want.get("size"), int) and want["size"] != size:
            problems.append(VerifyProblem(rel, "size", f"is {format_bytes(size)}, the Hub file is "
                            f"{format_bytes(want['size'])} ({'truncated' if size < want['size'] else 'wrong file'})"))
            continue
        checked.append((rel, size))
        if err := structure_problem(path, deep=deep and not want):
            problems.append(VerifyProblem(rel, "corrupt", err))
        elif deep and want.get("hash") and hash_file(path, want["hash_kind"], size).hexdigest() != want["hash"]:
            problems.append(VerifyProblem(rel, "corrupt", "content does not match the Hub checksum (file is corrupt)"))
    if problems:
        return None
    try:
        return weights_layout.locate(root)
    except WeightsError as exc:
        problems.append(VerifyProblem(".", "layout", str(exc)))
        return None



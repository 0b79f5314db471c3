"""The shipped presets load, and every malformed preset is a loud error naming file and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from presets import (DECODE_SETTINGS, PRESETS_DIR, RAM_ONLY_SETTINGS, MemoryRung, OffloadGranularity, PresetError,
                     build_settings, dit_settings, gpu_settings, lean_decode, load_presets)

GOOD = """\
label = "small"
height = 480
width = 832
frames = 49
fps = 16
steps = 4
shift = 5.0
guidance = 1.0
{extra}
[[rungs]]
name = "fast"
{rung_extra}
"""


def write(directory: Path, name: str, extra: str = "", rung_extra: str = "", text: str | None = None) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text if text is not None else GOOD.format(extra=extra, rung_extra=rung_extra))
    return path


def test_shipped_presets_are_the_three_required_ones():
    book = load_presets()
    assert {(p.height, p.width, p.frames) for p in book.values()} == {
        (480, 832, 49), (480, 832, 81), (720, 1280, 81)}
    for preset in book.values():
        assert preset.steps == 4 and preset.shift == 5.0 and preset.guidance == 1.0
        assert preset.rungs, preset.name
    assert [p.name for p in book.chain("720x1280x81")] == ["720x1280x81", "480x832x81", "480x832x49"]
    assert book["480x832x49"].fallback is None


def test_shipped_rungs_run_fast_to_lean():
    for preset in load_presets().values():
        peaks = [r.predicted_peak_gib for r in preset.rungs]
        assert all(p is not None for p in peaks), preset.name
        assert peaks == sorted(peaks, reverse=True), f"{preset.name}: rungs must get leaner: {peaks}"


def test_720p_needs_tiled_vae_on_every_rung():
    # docs/lightx2v.md §2: the untiled decode at 720p alone needs ~9 GiB.
    assert all(r.vae_tiling for r in load_presets()["720x1280x81"].rungs)


def test_rung_settings_are_typed(tmp_path):
    write(tmp_path, "a", rung_extra="offload_granularity = \"block\"\nvae_tiling = true\nrope_chunk = 100")
    rung = load_presets(tmp_path)["a"].rungs[0]
    assert rung.offload_granularity is OffloadGranularity.BLOCK
    assert rung.settings()["vae_tiling"] is True and rung.settings()["rope_chunk"] == 100


@pytest.mark.parametrize("extra, rung_extra, message", [
    ("colour = 1", "", "unknown field 'colour'"),
    ("", "tiling = true", "unknown field 'rungs[0].tiling'"),
    ("fallback = \"nope\"", "", "field 'fallback' names 'nope'"),
    ("", "offload_granularity = \"model\"", "'rungs[0].offload_granularity' must be one of block, phase; got 'model'"),
    ("", "text_encoder = \"cpu\"", "'rungs[0].text_encoder' must be one of offload, offload_keep_embedding, gpu"),
    ("", "rope_chunk = -1", "rope_chunk' must be >= 0"),
    ("", "vae_tiling = 1", "field 'rungs[0].vae_tiling' must be bool"),
    ("", "predicted_peak_gib = 0", "predicted_peak_gib' must be > 0"),
    ("", "predicted_host_gib = -2.0", "predicted_host_gib' must be > 0"),
    ("", "dit_from_disk = \"yes\"", "field 'rungs[0].dit_from_disk' must be bool"),
])
def test_bad_fields_name_file_and_field(tmp_path, extra, rung_extra, message):
    write(tmp_path, "bad", extra=extra, rung_extra=rung_extra)
    with pytest.raises(PresetError) as err:
        load_presets(tmp_path)
    assert "bad.toml" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("frames", "48", "must be 4n+1"),
    ("frames", "50", "must be 4n+1"),
    ("height", "470", "multiple of 16"),
    ("width", "0", "multiple of 16"),
    ("guidance", "5.0", "without CFG"),
    ("steps", "0", "steps' must be 4"),
    ("steps", "8", "steps' must be 4"),
    ("frames", "true", "field 'frames' must be int"),
    ("label", "3", "field 'label' must be str"),
])
def test_bad_values(tmp_path, field, value, message):
    text = GOOD.format(extra="", rung_extra="")
    text = "\n".join(f"{field} = {value}" if line.startswith(f"{field} =") else line
                     for line in text.splitlines())
    write(tmp_path, "v", text=text)
    with pytest.raises(PresetError) as err:
        load_presets(tmp_path)
    assert "v.toml" in str(err.value) and f"'{field}'" in str(err.value) and message in str(err.value)


def test_missing_field_and_missing_rungs(tmp_path):
    write(tmp_path, "m", text=GOOD.format(extra="", rung_extra="").replace("fps = 16\n", ""))
    with pytest.raises(PresetError, match=r"m\.toml: missing field 'fps'"):
        load_presets(tmp_path)
    (tmp_path / "m.toml").unlink()
    text = GOOD.format(extra="", rung_extra="").split("[[rungs]]")[0] + "rungs = []\n"
    write(tmp_path, "r", text=text)
    with pytest.raises(PresetError, match=r"r\.toml: field 'rungs' needs at least one"):
        load_presets(tmp_path)


def test_duplicate_rung_names(tmp_path):
    write(tmp_path, "d", rung_extra="\n[[rungs]]\nname = \"fast\"")
    with pytest.raises(PresetError, match=r"d\.toml: field 'rungs': duplicate"):
        load_presets(tmp_path)


def test_fallback_cycle_is_rejected(tmp_path):
    write(tmp_path, "a", extra='fallback = "b"')
    write(tmp_path, "b", extra='fallback = "a"')
    with pytest.raises(PresetError, match=r"a\.toml: field 'fallback' makes a cycle: a -> b -> a"):
        load_presets(tmp_path)


def test_self_fallback_is_a_cycle(tmp_path):
    write(tmp_path, "a", extra='fallback = "a"')
    with pytest.raises(PresetError, match="cycle"):
        load_presets(tmp_path)


def test_invalid_toml_and_empty_dir(tmp_path):
    with pytest.raises(PresetError, match="no preset files"):
        load_presets(tmp_path)
    write(tmp_path, "broken", text="label = \n")
    with pytest.raises(PresetError, match=r"broken\.toml: not valid TOML"):
        load_presets(tmp_path)


def test_copy_of_shipped_presets_loads_identically(tmp_path):
    for f in PRESETS_DIR.glob("*.toml"):
        shutil.copy(f, tmp_path)
    copied, shipped = load_presets(tmp_path), load_presets()
    # Every field of every preset and rung (the source path excepted), not just the names.
    assert dict(copied) == dict(shipped)
    assert [p.rungs for p in copied.values()] == [p.rungs for p in shipped.values()]
    assert all(copied[n].source.parent == tmp_path for n in copied)


def test_the_step_count_presets_require_is_the_backends_schedule():
    from pipeline.backends.lightx2v import DENOISING_STEPS
    from presets import DISTILLED_STEPS

    assert len(DENOISING_STEPS) == DISTILLED_STEPS


def test_every_preset_ends_on_a_low_ram_rung_with_the_leanest_gpu_settings():
    for preset in load_presets().values():
        low = preset.rungs[-1]
        assert (low.name, low.dit_from_disk, low.release_text_encoder) == ("low-ram", True, True), preset.name
        others = preset.rungs[:-1]
        assert all(not r.dit_from_disk for r in others)
        assert all(low.predicted_host_gib < r.predicted_host_gib for r in others), preset.name
        lean = others[-1].settings()
        assert gpu_settings(low.settings()) == gpu_settings(lean)
        assert low.predicted_peak_gib == others[-1].predicted_peak_gib


def test_when_each_memory_setting_takes_effect():
    base = MemoryRung("r").settings()
    # The lists name real settings (a renamed field must not leave a stale name behind).
    assert set(DECODE_SETTINGS) | set(RAM_ONLY_SETTINGS) <= set(base)
    build = build_settings(base)
    for name, value in (("vae_tiling", True), ("vae_offload", True), ("clean_cuda_cache", True),
                        ("rope_chunk", 100), ("release_text_encoder", True),
                        ("text_encoder", "offload_keep_embedding")):
        assert build_settings(dict(base, **{name: value})) == build, name  # per call: no reload
    for name, value in (("offload_granularity", "phase"), ("text_encoder", "gpu"), ("dit_from_disk", True)):
        assert build_settings(dict(base, **{name: value})) != build, name
    lean = lean_decode(base)
    assert {k for k in base if lean[k] != base[k]} == set(DECODE_SETTINGS)
    assert dit_settings(lean) == dit_settings(base) and gpu_settings(lean) != gpu_settings(base)
    low_ram = dict(base, dit_from_disk=True, release_text_encoder=True)
    assert gpu_settings(low_ram) == gpu_settings(base) and build_settings(low_ram) != build

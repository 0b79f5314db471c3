"""The one weights layout rule (pipeline/backends/weights_layout.py), as the backend, the doctor and the
downloader use it."""

from __future__ import annotations

import json

import pytest

from pipeline.backends import weights_layout
from pipeline.errors import WeightsError
from tests import fakeweights as fw


def _write(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _folder(root, **kw):
    files = fw.repo_files(num_layers=3, **kw)
    return _write(root, {p: files[p] for p in fw.needed_paths(files)})


def test_the_real_repo_layout_is_found(tmp_path):
    found = weights_layout.locate(_folder(tmp_path))
    assert found.num_layers == 3 and found.t5 == tmp_path / fw.T5 and found.vae == tmp_path / fw.VAE
    assert found.tokenizer == tmp_path / "google" / "umt5-xxl"
    assert found.tiny_vae is None and not found.synthetic


def test_config_is_merged_root_first_then_distill_int8_over_it(tmp_path):
    root = _folder(tmp_path)
    # The root config names every key; the quantized folder's overrides one, as LightX2V's set_config merges.
    (root / "distill_int8" / "config.json").write_text(json.dumps({"num_layers": 2}))
    (root / "config.json").write_text(json.dumps({**fw.CONFIG, "num_layers": 3, "dim": 64}))
    found = weights_layout.locate(root)
    assert found.num_layers == 2 and found.config["dim"] == 64
    assert found.config_paths == (root / "config.json", root / "distill_int8" / "config.json")


def test_config_only_in_the_root_and_pth_files_in_the_root(tmp_path):
    root = _folder(tmp_path)
    (root / "distill_int8" / "config.json").rename(root / "config.json")
    (root / fw.T5).rename(root / "models_t5_umt5-xxl-enc-int8.pth")
    found = weights_layout.locate(root)
    assert found.t5 == root / "models_t5_umt5-xxl-enc-int8.pth" and found.vae.parent.name == "distill_int8"


def test_tokenizer_under_distill_int8_is_found(tmp_path):
    root = _folder(tmp_path)
    (root / "distill_int8" / "google").mkdir()
    (root / "google" / "umt5-xxl").rename(root / "distill_int8" / "google" / "umt5-xxl")
    assert weights_layout.locate(root).tokenizer == root / "distill_int8" / "google" / "umt5-xxl"


@pytest.mark.parametrize("name", weights_layout.TINY_VAE_NAMES)
def test_an_optional_tiny_vae_is_recognised_when_present(tmp_path, name):
    root = _folder(tmp_path)
    (root / name).write_bytes(b"x")
    assert weights_layout.locate(root).tiny_vae == root / name


@pytest.mark.parametrize("change, message", [
    ("no tokenizer_config.json", "tokenizer"),
    ("no vocabulary", "tokenizer"),
    ("no block", r"block_1.*1 DiT file"),
    ("no vae", r"Wan2\.1_VAE\.pth"),
    ("no config", "config.json"),
    ("config lacks keys", "lacks keys the loader reads: dim"),
])
def test_what_is_missing_is_named(tmp_path, change, message):
    root = _folder(tmp_path)
    tok = root / "google" / "umt5-xxl"
    if change == "no tokenizer_config.json":
        (tok / "tokenizer_config.json").unlink()
    elif change == "no vocabulary":
        (tok / "tokenizer.json").unlink()
        (tok / "spiece.model").unlink()
    elif change == "no block":
        (root / "distill_int8" / "block_1.safetensors").unlink()
    elif change == "no vae":
        (root / fw.VAE).unlink()
    elif change == "no config":
        (root / "distill_int8" / "config.json").unlink()
    else:
        (root / "distill_int8" / "config.json").write_text(json.dumps({"num_layers": 3}))
    with pytest.raises(WeightsError, match=message):
        weights_layout.locate(root)


def test_missing_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        weights_layout.locate(tmp_path / "nowhere")


def test_the_rule_applies_to_a_repository_listing():
    files = fw.repo_files(num_layers=3)
    res = weights_layout.resolve(files.__contains__, 3)
    assert not res.missing and set(res.files) == fw.needed_paths(files)
    assert res.tiny_vae == "distill_int8/taew2_1.pth"  # listed in the repo, optional, not in `files`


def test_the_layout_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, pipeline.backends.weights_layout; "
            "print(sorted(m for m in ('torch', 'huggingface_hub', 'install') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

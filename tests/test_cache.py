"""The pipeline cache: one owner, reuse on the same key, reload on a new one, rollback on failure."""

from __future__ import annotations

import pytest

from pipeline.cache import PipelineCache
from pipeline.errors import ModelLoadError
from pipeline.backends.fake import FakeBackend
from presets import load_presets


def keys(backend):
    rungs = {r.name: r for p in load_presets().values() for r in p.rungs}
    return backend.load_key(rungs["fast"].settings()), backend.load_key(rungs["lean"].settings())


def test_same_key_reuses_and_per_call_settings_do_not_reload():
    backend = FakeBackend()
    cache = PipelineCache(backend)
    fast, _ = keys(backend)
    tiled = backend.load_key(load_presets()["480x832x81"].rung("tiled-vae").settings())
    assert tiled == fast  # vae_tiling is per call: no reload between these rungs
    first = cache.get(fast)
    assert cache.get(tiled) is first and cache.loads == 1


def test_new_key_releases_then_reloads():
    backend = FakeBackend()
    cache = PipelineCache(backend)
    fast, lean = keys(backend)
    first = cache.get(fast)
    second = cache.get(lean)
    assert second is not first and first.released and cache.loads == 2 and cache.key == lean


def test_failed_load_rolls_back_to_the_previous_model():
    backend = FakeBackend()
    cache = PipelineCache(backend)
    fast, lean = keys(backend)
    cache.get(fast)
    backend.fail_loads.add(lean)
    with pytest.raises(ModelLoadError, match="simulated load failure"):
        cache.get(lean)
    assert cache.key == fast and cache.is_loaded
    assert backend.loads == [fast, fast]  # reloaded the working settings


def test_failed_first_load_leaves_nothing_loaded():
    backend = FakeBackend()
    cache = PipelineCache(backend)
    fast, _ = keys(backend)
    backend.fail_loads.add(fast)
    with pytest.raises(ModelLoadError):
        cache.get(fast)
    assert not cache.is_loaded and cache.key is None
    backend.fail_loads.clear()
    assert cache.get(fast) is not None and cache.loads == 1


def test_release_frees_the_model():
    backend = FakeBackend()
    cache = PipelineCache(backend)
    fast, _ = keys(backend)
    model = cache.get(fast)
    cache.release()
    assert model.released and not cache.is_loaded

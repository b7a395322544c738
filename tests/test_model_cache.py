"""The cache of ONNX Runtime's optimised models (runtime/model_cache.py) on a tiny-sd export.

The reference for every image is a pipeline loaded with the cache off (sessions made from the
export's own ONNX files, as before the cache existed): a cached session must not change a pixel.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from linfusion.runtime import Pipeline, model_cache
from linfusion.runtime import manifest as mf
from linfusion.runtime.backends import onnxruntime as ort_backend
from linfusion.runtime.manifest import ManifestError

KW = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 3, "output_type": "np"}


@pytest.fixture(scope="module")
def export(exported, tmp_path_factory):
    """A private copy: some tests damage or rewrite files."""
    target = tmp_path_factory.mktemp("cache-export") / "tiny-sd"
    shutil.copytree(exported("tiny-sd"), target)
    return target


@pytest.fixture(scope="module")
def reference(export):
    pipe = Pipeline.from_export(export, backend="onnxruntime", cache_dir=False, intra_op_threads=1)
    return pipe("a red cube", **KW).images


def load(export, cache, **kw):
    return Pipeline.from_export(export, backend="onnxruntime", cache_dir=cache, intra_op_threads=1, **kw)


def events(pipe, component=None):
    cache = pipe.cache
    return [e for c, e in cache.events if component in (None, c)]


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "verified")


def unet_entry(pipe) -> Path:
    """The UNet's entry in the pipeline's cache."""
    return next(entry for entry in entries(pipe.cache.root)
                if json.loads((entry / model_cache.ENTRY).read_text())["component"] == "unet")


def test_miss_writes_entries_then_a_hit_gives_the_same_images(export, reference, tmp_path):
    cache = tmp_path / "cache"
    first = load(export, cache)
    assert events(first) == ["miss"] * 3  # text encoder, UNet, VAE decoder; the VAE encoder waits
    assert np.array_equal(first("a red cube", **KW).images, reference)
    assert len(entries(cache)) == 3 and not list(cache.glob(".partial-*"))
    for entry in entries(cache):
        record = json.loads((entry / model_cache.ENTRY).read_text())
        assert set(record["files"]) == {model_cache.MODEL, model_cache.DATA}  # weights outside the graph

    second = load(export, cache)
    assert events(second) == ["hit"] * 3
    assert Path(second.runners["unet"].session._model_path) == unet_entry(second) / model_cache.MODEL
    assert np.array_equal(second("a red cube", **KW).images, reference)
    second.runner("vae_encoder")  # loaded on first use (img2img), cached like the others
    assert events(second, "vae_encoder") == ["miss"] and len(entries(cache)) == 4


def damage(path: Path, keep_mtime: bool) -> None:
    """Flip bytes in the middle of a file, keeping its size (and, if asked, its mtime)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("how", ["weights flipped, mtime kept", "graph truncated", "entry.json garbage"])
def test_a_damaged_entry_is_rebuilt_never_used(export, reference, tmp_path, how):
    cache = tmp_path / "cache"
    entry = unet_entry(load(export, cache))
    if how == "weights flipped, mtime kept":
        damage(entry / model_cache.DATA, keep_mtime=True)  # only the sha256 (verify=True) can see it
    elif how == "graph truncated":
        (entry / model_cache.MODEL).write_bytes((entry / model_cache.MODEL).read_bytes()[:100])
    else:
        (entry / model_cache.ENTRY).write_text("{not json")
    pipe = load(export, cache)
    assert events(pipe, "unet")[0].startswith("rebuilt: "), events(pipe, "unet")
    assert np.array_equal(pipe("a red cube", **KW).images, reference)
    assert events(load(export, cache), "unet") == ["hit"]  # the rebuilt entry is good


def test_an_entry_ort_cannot_read_is_rebuilt_without_verify(export, reference, tmp_path):
    cache = tmp_path / "cache"
    entry = unet_entry(load(export, cache))
    graph = entry / model_cache.MODEL
    stat = graph.stat()
    graph.write_bytes(b"\x00garbage" * (stat.st_size // 8) + b"\x00" * (stat.st_size % 8))
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as recorded
    pipe = load(export, cache, verify=False)
    seen = events(pipe, "unet")  # its checks pass, so ONNX Runtime is what refuses it
    assert seen[0] == "hit" and seen[1].startswith("rebuilt: ONNX Runtime cannot load it"), seen
    assert np.array_equal(pipe("a red cube", **KW).images, reference)


def test_the_key_follows_the_export_and_the_session_settings(export, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load(export, cache)
    unet_file = export / "unet" / "model.onnx"
    stat = unet_file.stat()
    os.utime(unet_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "rewritten" in place
    try:
        assert events(load(export, cache, verify=False)) == ["hit", "miss", "hit"]
    finally:
        os.utime(unet_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    settings = {**ort_backend.SESSION_DEFAULTS, "graph_optimization_level": "ORT_ENABLE_BASIC"}
    monkeypatch.setattr(ort_backend, "SESSION_DEFAULTS", settings)
    assert events(load(export, cache)) == ["miss"] * 3
    monkeypatch.setattr(model_cache, "cpu_fingerprint", lambda: "another cpu")
    assert events(load(export, cache)) == ["miss"] * 3


def with_external_data(source: Path, target: Path) -> Path:
    """The export with its UNet's weights in an external data file, as large exports have them."""
    import onnx

    shutil.copytree(source, target)
    unet = target / "unet"
    model = onnx.load(str(unet / "model.onnx"))
    onnx.save_model(model, str(unet / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    data = json.loads((target / mf.MANIFEST_NAME).read_text())
    data["components"]["unet"]["external_data"] = "unet/model.onnx_data"
    data["files"] = mf.file_records(target)
    data[mf.DIGEST_KEY] = mf.content_digest(data)
    (target / mf.MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return target


def test_an_export_with_external_data(export, reference, tmp_path):
    external = with_external_data(export, tmp_path / "external")
    assert (external / "unet" / "model.onnx_data").stat().st_size > 4 * (external / "unet" / "model.onnx").stat().st_size
    cache = tmp_path / "cache"
    first = load(external, cache)
    assert events(first, "unet") == ["miss"]
    second = load(external, cache)
    assert events(second, "unet") == ["hit"]
    assert np.array_equal(second("a red cube", **KW).images, reference)


def test_the_export_is_hashed_once_per_change(export, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    hashed = []
    real = mf.sha256_file
    def counting(path, *args):
        if Path(path).is_relative_to(export):  # not the cache's own entries
            hashed.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(mf, "sha256_file", counting)
    load(export, cache)
    assert len(hashed) == len(mf.load_manifest(export, verify=False).files)
    hashed.clear()
    load(export, cache)
    assert hashed == []  # nothing changed since the last full check
    victim = export / "vae_decoder" / "model.onnx"
    original = victim.read_bytes()
    try:
        damage(victim, keep_mtime=True)  # its ctime moves all the same
        with pytest.raises(ManifestError, match="checksum mismatch for vae_decoder/model.onnx"):
            load(export, cache)
        assert hashed == ["model.onnx"]
    finally:
        victim.write_bytes(original)
    load(export, cache, verify=True)  # restored: checked again and accepted


def test_off_switches_and_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(model_cache.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.resolve_dir() == tmp_path / "xdg" / "linfusion" / "ort"
    assert model_cache.resolve_dir(False) is None
    assert model_cache.resolve_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv(model_cache.ENV_DIR, "off")
    assert model_cache.resolve_dir() is None
    monkeypatch.setenv(model_cache.ENV_DIR, str(tmp_path / "env"))
    assert model_cache.resolve_dir() == tmp_path / "env"


def test_off_leaves_no_trace(export, tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.ENV_DIR, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    pipe = load(export, None)
    assert pipe.cache is None and not (tmp_path / "xdg").exists()


def test_prune_removes_the_least_recently_used(tmp_path):
    cache = model_cache.ModelCache(tmp_path, tmp_path, "m", {})
    for age, name in enumerate(["old", "mid", "new"]):
        entry = tmp_path / name
        entry.mkdir()
        (entry / model_cache.MODEL).write_bytes(b"x" * 1000)
        (entry / model_cache.ENTRY).write_text("{}")
        os.utime(entry / model_cache.ENTRY, (1000 + age, 1000 + age))
    cache.prune(max_bytes=2100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new"]


def test_a_lost_race_keeps_the_winner(export, tmp_path):
    """Two processes building the same entry: the second rename fails and its copy is dropped."""
    cache = tmp_path / "cache"
    pipe = load(export, cache)
    entry = unet_entry(pipe)
    staged = pipe.cache.staging()
    (staged / model_cache.MODEL).write_bytes(b"loser")
    pipe.cache.commit("unet", staged, entry.name)
    assert not staged.exists() and (entry / model_cache.MODEL).stat().st_size > 5

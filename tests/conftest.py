import os
import shutil
import tempfile

import pytest

# ONNX Runtime's model cache (runtime/model_cache.py) goes to a folder of this test session, not to
# ~/.cache; subprocesses inherit it. Removed when the session ends.
_CACHE = tempfile.mkdtemp(prefix="linfusion-test-cache-")
os.environ.setdefault("LINFUSION_CACHE", _CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd():
    from linfusion import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from linfusion import load_pipeline

    return load_pipeline("tiny-sdxl")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Exports of the tiny presets, made once per session: exported(preset, precision) -> Path."""
    from linfusion import load_pipeline
    from linfusion.export.exporter import PRECISIONS, export_pipeline

    cache = {}

    def get(preset, precision="fp32"):
        key = (preset, precision)
        if key not in cache:
            out = tmp_path_factory.mktemp("exports") / f"{preset}-{precision}"
            loaded = load_pipeline(preset, dtype=PRECISIONS[precision])
            export_pipeline(loaded, out, precision, progress=lambda line: None)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def inpaint_export(exported, tmp_path_factory):
    """inpaint_export(preset) -> an export of tiny-sd(xl)-inpaint. Only its 9-channel UNet is exported
    here; the text encoders, VAE, tokenizers and scheduler come from the tiny-sd(xl) export, which has
    the same ones (same configs, same seeds: checked), to keep the test time down."""
    from dataclasses import replace

    import torch
    from linfusion.export.exporter import export_pipeline
    from linfusion.runtime.manifest import MANIFEST_NAME, file_records, load_manifest

    from linfusion import load_pipeline

    cache = {}

    def get(preset):
        if preset not in cache:
            base_preset = preset.removesuffix("-inpaint")
            ours, theirs = load_pipeline(preset).pipeline, load_pipeline(base_preset).pipeline
            for name in ("vae", "text_encoder", "text_encoder_2"):
                if hasattr(theirs, name):
                    a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
                    assert all(torch.equal(a[k], b[k]) for k in b), name
            base, tmp = exported(base_preset), tmp_path_factory.mktemp("inpaint")
            unet_only, out = tmp / "unet-only", tmp / preset
            export_pipeline(load_pipeline(preset), unet_only, components=["unet"], progress=lambda line: None)
            shutil.copytree(base, out)
            shutil.rmtree(out / "unet")
            shutil.copytree(unet_only / "unet", out / "unet")
            shutil.copy(unet_only / "model_index.json", out / "model_index.json")
            own, merged = load_manifest(unet_only), load_manifest(base)
            merged = replace(merged, source=own.source, pipeline=own.pipeline,
                             components={**merged.components, "unet": own.components["unet"]},
                             parity={**merged.parity, "unet": own.parity["unet"]})
            (out / MANIFEST_NAME).write_text(merged.with_files(file_records(out)).to_json())
            cache[preset] = out
        return cache[preset]

    return get

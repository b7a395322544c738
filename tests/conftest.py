import os
import shutil
import tempfile

import pytest
from partial_export import export_onto, same_weights

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
    from linfusion.export.exporter import PRECISIONS, export_pipeline

    from linfusion import load_pipeline

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
    from linfusion import load_pipeline

    cache = {}

    def get(preset):
        if preset not in cache:
            base_preset = preset.removesuffix("-inpaint")
            loaded = load_pipeline(preset)
            same_weights(loaded.pipeline, load_pipeline(base_preset).pipeline)
            tmp = tmp_path_factory.mktemp("inpaint")
            export_onto(exported(base_preset), loaded, ["unet"], tmp / preset, tmp)
            cache[preset] = tmp / preset
        return cache[preset]

    return get

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

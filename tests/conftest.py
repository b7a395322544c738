import pytest


@pytest.fixture(scope="session")
def tiny_sd():
    from linfusion import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from linfusion import load_pipeline

    return load_pipeline("tiny-sdxl")

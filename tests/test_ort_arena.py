"""One CPU arena shared by the ONNX Runtime sessions (runtime/backends/onnxruntime.py): chosen by
LINFUSION_ORT_ARENA, and it lowers a generation's peak memory (fresh processes, measured)."""

import pytest
from linfusion.runtime.backends import onnxruntime as backend
from peak_rss import peak_rss_of_cli


@pytest.mark.parametrize("value, arena, shared", [("", True, True), ("shared", True, True), ("session", True, False),
                                                  ("off", False, False), ("OFF", False, False)])
def test_the_environment_chooses_the_arena(monkeypatch, value, arena, shared):
    monkeypatch.setenv(backend.ARENA_ENV, value)
    settings = backend.OnnxRuntimeBackend().settings("unet")
    assert (settings["enable_cpu_mem_arena"], settings["shared_arena"]) == (arena, shared)


def test_a_bad_arena_value_is_one_line(monkeypatch):
    monkeypatch.setenv(backend.ARENA_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"^LINFUSION_ORT_ARENA='sometimes': use shared \(the default\), session or off$"):
        backend.OnnxRuntimeBackend().settings("unet")


def test_sessions_use_the_shared_arena_unless_told_otherwise(exported):
    from linfusion.runtime import Pipeline

    pipe = Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime")
    options = pipe.runners["unet"].session.get_session_options()
    assert options.get_session_config_entry("session.use_env_allocators") == "1" and pipe.footprint.shared_arena
    own = Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime", session_options={"shared_arena": False})
    with pytest.raises(Exception, match="use_env_allocators"):  # never set
        own.runners["unet"].session.get_session_options().get_session_config_entry("session.use_env_allocators")
    assert not own.footprint.shared_arena


@pytest.mark.slow
def test_a_shared_arena_lowers_the_peak(exported, tmp_path):
    """512 px untiled, tiny-sd: the VAE decoder reuses what the UNet's calls freed (measured 299 against
    380 MiB with an arena per session)."""
    args = [str(exported("tiny-sd")), "--prompt", "x", "--height", "512", "--width", "512", "--steps", "2",
            "--tile-vae", "off", "--hires", "off", "--backend", "onnxruntime", "--output", str(tmp_path / "o.png")]
    shared = peak_rss_of_cli(args, tmp_path / "shared", {backend.ARENA_ENV: "shared"})
    own = peak_rss_of_cli(args, tmp_path / "own", {backend.ARENA_ENV: "session"})
    assert shared < 0.9 * own, (shared / 2**20, own / 2**20)


def test_both_clis_refuse_a_bad_arena_value_in_one_line(exported, monkeypatch, capsys, tmp_path):
    from linfusion.runtime.cli import main as generate
    from linfusion.serve.cli import main as serve

    monkeypatch.setenv(backend.ARENA_ENV, "bogus")
    expected = "LINFUSION_ORT_ARENA='bogus': use shared (the default), session or off"
    assert generate([str(exported("tiny-sd")), "--prompt", "x", "--output", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"linfusion-generate: error: {expected}"
    assert not (tmp_path / "o.png").exists()
    assert serve([str(exported("tiny-sd"))]) == 2
    assert capsys.readouterr().err.strip() == f"linfusion-serve: error: {expected}"

"""Interrupted exports and builds leave nothing behind, and what they write is readable by others.

The signal tests kill a real ``linfusion-export`` process; the builder's are run in a child
process too, so that a regression (SIGTERM killing the process) fails one test instead of
killing the test run.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest
from linfusion.export.exporter import _replace_directory, export_pipeline
from linfusion.runtime.signals import Terminated

EXPORT_CLI = Path(sys.executable).with_name("linfusion-export")
TEXT_ONLY = ["text_encoder"]  # the quickest component to export: a few seconds


def start_export(out: Path) -> subprocess.Popen:
    """``linfusion-export --model tiny-sd --skip-parity`` with default SIGTERM/SIGHUP handling
    (a test run under ``nohup`` would otherwise hand the child an ignored SIGHUP)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        return subprocess.Popen([str(EXPORT_CLI), "--model", "tiny-sd", "--skip-parity", "--output", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGHUP, previous)


def staging_with_a_file(out: Path, proc: subprocess.Popen, timeout: float = 400) -> Path:
    """The export's hidden staging folder, once a file (text_encoder/model.onnx) is in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in out.parent.glob(f".{out.name}.partial-*"):
            try:
                if any(path.is_file() for path in folder.rglob("*")):
                    return folder
            except FileNotFoundError:
                continue
        if proc.poll() is not None:
            pytest.fail(f"the export ended (rc {proc.returncode}) before writing: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the export wrote nothing within the time limit")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_terminated_export_leaves_nothing_and_exits_128_plus_the_signal(tmp_path, signum):
    out = tmp_path / "tiny"
    proc = start_export(out)
    staging = staging_with_a_file(out, proc)
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], f"left behind: {sorted(p.name for p in tmp_path.rglob('*'))}"
    assert not staging.exists()
    assert f"terminated by {signal.Signals(signum).name}" in stderr.strip().splitlines()[-1]


def test_a_killed_exports_staging_is_removed_by_the_next_export_but_a_running_ones_is_kept(tmp_path, tiny_sd):
    """A real SIGKILLed export leaves its staging folder; the next export into the same parent
    deletes it, but not while that process is still alive (here: stopped with SIGSTOP)."""
    proc = start_export(tmp_path / "killed")
    staging = staging_with_a_file(tmp_path / "killed", proc)
    os.kill(proc.pid, signal.SIGSTOP)
    unknown = tmp_path / ".other.partial-k3x_9q2a"  # made by a version that did not record its owner
    unknown.mkdir()
    try:
        lines = []
        export_pipeline(tiny_sd, tmp_path / "second", components=TEXT_ONLY, skip_parity=True,
                        progress=lines.append)
        assert staging.is_dir(), "the staging folder of a running export was deleted"
        assert not any(staging.name in line for line in lines)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert staging.is_dir()  # SIGKILL runs no cleanup
    lines = []
    export_pipeline(tiny_sd, tmp_path / "third", components=TEXT_ONLY, skip_parity=True, progress=lines.append)
    assert not staging.exists()
    assert sum(staging.name in line and "removed" in line for line in lines) == 1
    warnings = [line for line in lines if unknown.name in line]
    assert unknown.is_dir() and len(warnings) == 1 and warnings[0].startswith("warning:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [unknown.name, "second", "third"]


def test_an_interrupted_replace_puts_the_previous_export_back(tmp_path, monkeypatch):
    out, staging = tmp_path / "out", tmp_path / ".out.partial-x"
    out.mkdir()
    (out / "model_index.json").write_text("old")
    staging.mkdir()
    (staging / "model_index.json").write_text("new")
    rename = Path.rename

    def rename_then_terminated(self, target):
        if self == staging:  # SIGTERM right between moving the old export aside and renaming the new one
            raise Terminated(signal.SIGTERM)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_terminated)
    with pytest.raises(Terminated):
        _replace_directory(staging, out)
    assert (out / "model_index.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name, "out"]


def _modes(root: Path) -> tuple[set[int], set[int]]:
    paths = [root, *root.rglob("*")]
    return ({p.stat().st_mode & 0o777 for p in paths if p.is_dir()},
            {p.stat().st_mode & 0o777 for p in paths if p.is_file()})


@pytest.mark.parametrize("umask,folders,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask022", "umask027"])
def test_exports_and_engines_get_the_umasks_permissions(tmp_path, tiny_sd, monkeypatch, umask, folders, files):
    from linfusion.engines import builder as B
    from linfusion.engines.profiles import Range, spatial_profiles
    from linfusion.runtime.manifest import load_manifest

    monkeypatch.setattr(B, "builder_tensorrt", lambda: types.SimpleNamespace(__version__="10.12.0.36"))
    monkeypatch.setattr(B, "gpu_info", lambda: ("Fake GPU", "9.0"))
    monkeypatch.setattr(B, "build_engine", lambda trt, path, profiles, options, log: memoryview(b"plan"))
    out = tmp_path / "export"
    previous = os.umask(umask)
    try:
        export_pipeline(tiny_sd, out, components=TEXT_ONLY, skip_parity=True, progress=lambda line: None)
        assert _modes(out) == ({folders}, {files})
        # --force replaces it through the .old- folder; the new one gets the same modes
        export_pipeline(tiny_sd, out, components=TEXT_ONLY, skip_parity=True, force=True, progress=lambda line: None)
        assert _modes(out) == ({folders}, {files})
        options = B.BuildOptions(spatial=spatial_profiles(load_manifest(out).pixel_multiple, 64, 64, 64),
                                 batch=Range(1, 1, 1), output=out / "engines", plugin="off")
        B.build_all(out, options, log=lambda line: None)
    finally:
        os.umask(previous)
    engines = out / "engines"
    assert {p.name for p in engines.iterdir()} >= {"engines.json", "text_encoder.plan"}
    assert _modes(engines) == ({folders}, {files})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# The TensorRT builder, faked as TensorRT behaves: it calls the progress monitor between steps,
# swallows whatever the monitor raises, and returns None when step_complete returns False.
_BUILD_CHILD = textwrap.dedent("""
    import json, os, signal, sys, types
    from pathlib import Path
    from linfusion.engines import builder as B
    from linfusion.runtime.signals import Terminated

    signum = int(sys.argv[1])
    steps = []

    class Monitor:
        def __init__(self):
            pass

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): return Network()
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return types.SimpleNamespace(set_shape=lambda *a: None)
        def build_serialized_network(self, network, config):
            for step in range(200):
                if step == 3:
                    os.kill(os.getpid(), signum)
                try:
                    cont = config.progress_monitor.step_complete("Building", step)
                except BaseException as exc:  # TensorRT swallows it
                    steps.append(type(exc).__name__)
                    cont = True
                steps.append(step)
                if not cont:
                    return None
            return b"engine"

    class Network:
        num_inputs = 0

    class Config:
        progress_monitor = None
        def add_optimization_profile(self, profile): return 0
        def create_timing_cache(self, data): return object()
        def set_timing_cache(self, cache, ignore_mismatch): return True
        def get_timing_cache(self): return None

    class Parser:
        def __init__(self, network, logger): pass
        def parse_from_file(self, path): return True

    trt = types.SimpleNamespace(__version__="10.12.0.36", Builder=Builder, OnnxParser=Parser,
                                IProgressMonitor=Monitor, Logger=lambda level: None,
                                NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    trt.Logger.WARNING = 2
    options = B.BuildOptions(spatial=[], batch=None, output=Path("."), optimization_level=3)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        B.build_engine(trt, Path("model.onnx"), [], options, lambda line: None)
        outcome = "built"
    except Terminated as exc:
        outcome = "Terminated " + exc.name
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    restored = all(signal.getsignal(s) is h for s, h in before.items())
    print(json.dumps({"outcome": outcome, "steps": steps, "restored": restored}))
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_cancel_a_build_like_sigint(signum):
    """The build is cancelled at the next progress step (TensorRT would swallow an exception
    raised there); afterwards SIGINT surfaces as KeyboardInterrupt, SIGTERM and SIGHUP as
    Terminated, both caught by build_all's cleanup and the CLI."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        proc = subprocess.run([sys.executable, "-c", _BUILD_CHILD, str(int(signum))], check=False,
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = "KeyboardInterrupt" if signum == signal.SIGINT else f"Terminated {signal.Signals(signum).name}"
    assert result["outcome"] == expected
    assert result["restored"]
    steps = result["steps"]
    assert steps[-1] < 10 and all(isinstance(s, int) for s in steps), steps  # cancelled, nothing swallowed


def test_a_folder_with_this_processes_pid_is_kept_only_while_this_process_uses_it(tmp_path):
    """Exports may run in threads of one process, and a container restarts with the same PIDs:
    a folder named with our PID is ours only if we are using it."""
    from linfusion.export import exporter as E

    earlier = Path(tempfile.mkdtemp(prefix=E._staging_prefix("a", "partial"), dir=tmp_path))
    running = Path(tempfile.mkdtemp(prefix=E._staging_prefix("b", "partial"), dir=tmp_path))
    E._ACTIVE.add(running.name)
    try:
        lines = []
        assert E.remove_stale_staging(tmp_path, lines.append) == [earlier]
    finally:
        E._ACTIVE.discard(running.name)
    assert running.is_dir() and not earlier.exists() and len(lines) == 1

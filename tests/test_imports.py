import subprocess
import sys
import textwrap

from torchless import run_without_torch

def run(code):
    return run_without_torch(code, timeout=120)


def test_package_and_runtime_import_without_torch():
    result = run("""
        import linfusion, linfusion.runtime
        assert linfusion.__version__
        assert_torch_free()
        print('ok')
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_blocker_does_block():
    """Guard against a vacuous pass: the same harness must fail on the model API."""
    result = run("import linfusion; linfusion.LinFusion")
    assert result.returncode != 0 and "blocked in this test" in result.stderr


def test_namespace_maps_the_four_folders():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import pathlib, linfusion, linfusion.export, linfusion.engines, linfusion.runtime
        for mod, folder in [(linfusion, 'linfusion'), (linfusion.export, 'export'),
                            (linfusion.engines, 'engines'), (linfusion.runtime, 'runtime')]:
            print(pathlib.Path(mod.__file__).parent.name == folder)
        import importlib.util
        print(importlib.util.find_spec('runtime') is None and importlib.util.find_spec('export') is None)
    """)], capture_output=True, text=True, cwd="/", timeout=120)
    assert result.stdout.split() == ["True"] * 5, result.stderr

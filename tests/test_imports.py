import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in {'torch', 'diffusers', 'transformers'}:
                raise ImportError(f'{name} is blocked in this test')
    sys.meta_path.insert(0, Block())
""")


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_package_and_runtime_import_without_torch():
    result = run("""
        import linfusion, linfusion.runtime
        assert linfusion.__version__
        assert not any(m.split('.')[0] in {'torch', 'diffusers', 'transformers'} for m in sys.modules)
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

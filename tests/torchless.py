"""Running code in a fresh interpreter where torch, diffusers and transformers cannot be imported."""

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "diffusers", "transformers")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ImportError(f'{{name}} is blocked in this test')
    sys.meta_path.insert(0, Block())
    def assert_torch_free():
        loaded = [m for m in sys.modules if m.split('.')[0] in BLOCKED]
        assert not loaded, loaded
""")


def run_without_torch(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) after the blocker; ``assert_torch_free()`` is available to it."""
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout)

import importlib.util
import os
import sys

# CPU-only defaults for every test: DeepSpeed's CPU accelerator and one shared build of its C++ ops.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))

# The torchrun launcher shared by the 2-rank tests, importable as `mimkit_test_distributed`
# (tests run in importlib mode, where sibling modules are not on sys.path).
_spec = importlib.util.spec_from_file_location("mimkit_test_distributed", os.path.join(ROOT, "tests", "distributed.py"))
_launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_launcher)
sys.modules["mimkit_test_distributed"] = _launcher


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test gets the environment it started with: a rank variable left behind by one test
    (LOCAL_RANK, MASTER_ADDR, ...) would make the next one try to join a process group."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

import os

# CPU-only defaults for every test: DeepSpeed's CPU accelerator and one shared build of its C++ ops.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test gets the environment it started with: a rank variable left behind by one test
    (LOCAL_RANK, MASTER_ADDR, ...) would make the next one try to join a process group."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

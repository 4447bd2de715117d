"""What the test files share: a fresh load of the native library for tests that change how it loads,
every instruction-set level of the native kernels that this machine runs, and one synthetic BitNet 2B4T
release folder."""

import pytest

from trillm.native import build
from trillm.synth import write_preset


def forget_native():
    build.load.cache_clear()
    build.library.cache_clear()


@pytest.fixture
def fresh_native(monkeypatch):
    """Lets a test change how the library loads; the real one is loaded again afterwards."""
    forget_native()
    yield
    monkeypatch.undo()
    forget_native()


@pytest.fixture(params=list(build.LEVELS))
def native_level(request, monkeypatch):
    """Each instruction-set level in turn, as the library that the ops and the weight modules built inside
    the test use (TRILLM_ISA); a level this CPU cannot run is skipped. Yields the level's name."""
    level = request.param
    if level not in build.runnable_levels():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    if build.library(level) is None:
        pytest.skip("the native kernels could not be built")
    monkeypatch.setenv("TRILLM_ISA", level)
    build.load.cache_clear()
    yield level
    monkeypatch.undo()
    build.load.cache_clear()


@pytest.fixture(scope="session")
def bitnet_2b4t_folder(tmp_path_factory):
    """The 2B4T release's packed layout, random codes (1.2 GB): written once for every test that reads it."""
    return write_preset("bitnet-b1.58-2b-4t", tmp_path_factory.mktemp("bitnet-2b4t") / "model")

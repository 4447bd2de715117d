"""Building and loading the native kernels: one library per instruction-set level, the widest this CPU
runs unless TRILLM_ISA names another, and the warning-once fallback to the PyTorch twins."""

import logging
import os
import subprocess
import sys

import pytest

from trillm.errors import TrillmError
from trillm.native import build
from trillm.weights import make_linear
from trillm.weights.ggml import ReferenceGGMLLinear

from test_weights import Q, random_ggml


def test_each_level_is_built_for_its_vector_width(native_level):
    """The flags of a level must select its path in csrc/kernels.h (AVX-512: 16 floats a vector, AVX2 and
    AVX-VNNI: 8, C: 1; VNNI's dot products in AVX-512 and AVX-VNNI): a missing flag would silently build the
    narrower kernels."""
    library = build.load()
    assert library.trillm_vector_floats() == {"avx512": 16, "avxvnni": 8, "avx2": 8, "c": 1}[native_level]
    assert library.trillm_vnni() == (native_level in ("avx512", "avxvnni"))


def test_the_widest_runnable_level_is_the_default(fresh_native, monkeypatch):
    monkeypatch.delenv("TRILLM_ISA", raising=False)
    assert build.chosen_level() == build.runnable_levels()[0]
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "sse2"}))
    assert build.runnable_levels() == ["avx2", "c"] and build.chosen_level() == "avx2"
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx_vnni"}))  # Alder Lake
    assert build.runnable_levels() == ["avxvnni", "avx2", "c"]
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "sse2"}))  # AVX2 without FMA
    assert build.chosen_level() == "c"


def test_trillm_isa_forces_a_level_or_the_twins(fresh_native, monkeypatch):
    monkeypatch.setenv("TRILLM_ISA", "c")
    assert build.chosen_level() == "c"
    monkeypatch.setenv("TRILLM_ISA", "reference")
    assert build.chosen_level() is None and build.load() is None
    assert isinstance(make_linear(random_ggml(Q.Q8_0, 4, 32)), ReferenceGGMLLinear)
    monkeypatch.setenv("TRILLM_ISA", "sse9")
    with pytest.raises(TrillmError, match="TRILLM_ISA='sse9': choose one of avx512, avxvnni, avx2, c, reference"):
        build.chosen_level()
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv("TRILLM_ISA", "avx512")
    with pytest.raises(TrillmError, match="this CPU cannot run it .it runs avx2, c."):
        build.chosen_level()


def test_missing_compiler_warns_once_and_falls_back(fresh_native, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TRILLM_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "COMPILER", "no-such-gcc")
    with caplog.at_level(logging.WARNING, logger="trillm"):
        assert build.load() is None
        assert build.load() is None
        assert isinstance(make_linear(random_ggml(Q.Q8_0, 4, 32)), ReferenceGGMLLinear)
    assert len(caplog.records) == 1 and "native kernels unavailable" in caplog.text


def test_compile_error_warns_with_the_error(fresh_native, monkeypatch, tmp_path, caplog):
    (tmp_path / "broken.c").write_text("int broken = ;\n")
    monkeypatch.setenv("TRILLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    with caplog.at_level(logging.WARNING, logger="trillm"):
        assert build.load() is None
    assert "could not compile the native kernels" in caplog.text and "error" in caplog.text
    assert not list((tmp_path / "cache" / "native").iterdir())  # no partial library left behind


@pytest.mark.parametrize("imports,warned", [("import torch, trillm", True), ("import trillm, torch", False)])
def test_torch_imported_first_is_told(imports, warned):
    """OpenMP reads OMP_WAIT_POLICY when torch loads it: trillm's PASSIVE comes too late after torch."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_WAIT_POLICY", "TRILLM_KEEP_OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and ("import trillm before torch" in result.stderr) == warned, result.stderr
    chosen = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, timeout=120,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"})  # the user's own choice: nothing to say
    assert chosen.returncode == 0 and "import trillm before torch" not in chosen.stderr

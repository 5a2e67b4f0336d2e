"""setup.py's choice of instruction set for the CPU kernels, and what the built extension says."""
from __future__ import annotations

import importlib.util
import os

import pytest

from shade_ops import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX512_HOST = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "sse4_2"}
AVX2_HOST = {"avx2", "fma", "f16c", "sse4_2"}


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module (importing it does not build), on a pretend x86-64 host."""
    spec = importlib.util.spec_from_file_location("shade_ops_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(module, "_compiler_accepts", lambda flags, body: True)
    monkeypatch.delenv("SHADE_OPS_ISA", raising=False)
    monkeypatch.delenv("SHADE_OPS_NATIVE", raising=False)
    return module


def _capability(flags: list[str]) -> str | None:
    found = [f.split("=", 1)[1] for f in flags if f.startswith("-DCPU_CAPABILITY=")]
    return found[0] if found else None


def test_best_instruction_set_of_the_host(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_host_flags", lambda: AVX512_HOST)
    flags = setup_py.cpu_flags()
    assert _capability(flags) == "AVX512" and "-mavx512f" in flags and "-fopenmp" in flags
    monkeypatch.setattr(setup_py, "_host_flags", lambda: AVX2_HOST)
    assert _capability(setup_py.cpu_flags()) == "AVX2"
    monkeypatch.setattr(setup_py, "_host_flags", lambda: {"sse4_2"})
    assert _capability(setup_py.cpu_flags()) is None


def test_compiler_without_avx512_gets_avx2(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_host_flags", lambda: AVX512_HOST)
    monkeypatch.setattr(setup_py, "_compiler_accepts",
                        lambda flags, body: "-mavx512f" not in flags)
    assert _capability(setup_py.cpu_flags()) == "AVX2"


def test_environment_caps_or_disables(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_host_flags", lambda: AVX512_HOST)
    monkeypatch.setenv("SHADE_OPS_ISA", "avx2")
    assert _capability(setup_py.cpu_flags()) == "AVX2"
    monkeypatch.setenv("SHADE_OPS_ISA", "sse")
    with pytest.raises(ValueError, match="SHADE_OPS_ISA"):
        setup_py.cpu_flags()
    monkeypatch.delenv("SHADE_OPS_ISA")
    monkeypatch.setenv("SHADE_OPS_NATIVE", "0")
    assert _capability(setup_py.cpu_flags()) is None


def test_other_architectures_get_portable_flags(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(setup_py, "_host_flags", lambda: AVX512_HOST)
    assert setup_py.cpu_flags() == ["-O3", "-fopenmp"]


@pytest.mark.skipif(_ops.NATIVE_OPS is None, reason="shade_ops._C is not built")
def test_built_extension_names_its_instruction_set():
    from shade_ops import _C

    assert _C.CPU_CAPABILITY in ("avx512", "avx2", "default")
    assert _ops.cpu_kernels_unusable(_C.CPU_CAPABILITY) is None  # built here, runs here

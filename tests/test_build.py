"""setup.py's choice of instruction set for the CPU kernels, and what the built extension says."""
from __future__ import annotations

import importlib
import json
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from shade_ops import _ops, _registry

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


# ---- what the library says about itself, read before it is loaded ------------------------

def test_cxx_standard_follows_torch(setup_py):
    assert setup_py.cxx_standard("2.13.0+cpu") == "-std=c++17"
    assert setup_py.cxx_standard("2.14.1") == "-std=c++20"
    assert setup_py.cxx_standard("3.0.0.dev20270101+cu130") == "-std=c++20"
    assert not any(flag.startswith("-std") for flag in setup_py.cpu_flags())


def test_build_info_is_a_preprocessor_token(setup_py):
    assert setup_py.build_info_flags("2.14.1+cu130") == ["-DSHADE_OPS_TORCH_VERSION=2.14.1+cu130"]
    assert setup_py.build_info_flags("2.15.0 weird") == ["-DSHADE_OPS_TORCH_VERSION=2.15"]


def _library_file(tmp_path, info: bytes | None) -> str:
    path = tmp_path / "_C.so"
    path.write_bytes(b"\x7fELF" + b"\0" * 5000 + (info or b"") + b"\0" * 100)
    return str(path)


def test_build_info_read_from_the_file(tmp_path):
    path = _library_file(tmp_path, b"shade_ops-build-info:torch=2.14.1+cu130;isa=avx2;")
    assert _registry.read_build_info(path) == {"torch": "2.14.1+cu130", "isa": "avx2"}
    assert _registry.read_build_info(_library_file(tmp_path, None)) == {}


def test_library_of_another_torch_is_not_loaded(tmp_path, monkeypatch):
    path = _library_file(tmp_path, b"shade_ops-build-info:torch=2.99.0;isa=default;")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: importlib.machinery.ModuleSpec(name, None, origin=path))
    monkeypatch.setattr(importlib, "import_module", _must_not_load)
    module, why = _registry.load_native()
    assert module is None and "built for torch 2.99.0" in why and torch.__version__ in why
    assert "--no-build-isolation" in why
    assert _registry.torch_mismatch("2.13.0", "2.13.1+cpu") is None  # same release line


def test_library_for_missing_instructions_is_not_loaded(tmp_path, monkeypatch):
    path = _library_file(tmp_path, f"shade_ops-build-info:torch={torch.__version__};"
                                   f"isa=avx512;".encode())
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: importlib.machinery.ModuleSpec(name, None, origin=path))
    monkeypatch.setattr(importlib, "import_module", _must_not_load)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    module, why = _registry.load_native()
    assert module is None and "AVX512" in why and "SHADE_OPS_NATIVE=0" in why


def test_missing_library_says_not_built(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    module, why = _registry.load_native()
    assert module is None and why.startswith("shade_ops._C is not built")
    assert "circular" not in why and "--no-build-isolation" in why


def _must_not_load(name):
    raise AssertionError(f"{name} was loaded")


@pytest.mark.skipif(_ops.NATIVE_OPS is None, reason="shade_ops._C is not built")
def test_built_extension_names_its_torch():
    from shade_ops import _C

    assert _C.TORCH_VERSION == torch.__version__
    assert _registry.read_build_info(_C.__file__) == {"torch": torch.__version__,
                                                      "isa": _C.CPU_CAPABILITY}


# ---- setup.py without torch, and the sdist ------------------------------------------------

def _setup_without_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """setup.py run as pip's isolated build environment runs it: torch cannot be imported."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.mark.parametrize("command", ["dist_info", "bdist_wheel", "build_ext"])
def test_build_without_torch_stops_at_once_naming_no_build_isolation(tmp_path, command):
    result = _setup_without_torch(tmp_path, command, "--dry-run")
    assert result.returncode != 0
    assert "pip install --no-build-isolation" in result.stderr


def test_sdist_without_torch_has_every_source(tmp_path):
    result = _setup_without_torch(tmp_path, "-q", "sdist", "--dist-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("shade_ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc", "shade_ops"], cwd=ROOT, text=True,
                             capture_output=True).stdout.split() if os.path.isdir(
        os.path.join(ROOT, ".git")) else []
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc/vec_exp.h",
              "csrc/shade_ops.cpp", "csrc/penalty_cpu.cpp", "csrc/autograd.cpp"}
    needed |= {name for name in tracked if name.endswith((".py", ".cpp", ".h", ".cu"))}
    assert needed <= names, sorted(needed - names)


@pytest.mark.slow
def test_install_without_a_compiler_runs_on_the_reference_backend(tmp_path):
    """pip with CC/CXX that fail: the install succeeds without shade_ops._C, and the library
    computes on the reference backend with one warning that says how to get the kernels."""
    source = tmp_path / "source"
    for name in ("shade_ops", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), source / name,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false"}
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                            "--no-deps", "--no-index", "--target", str(tmp_path / "site"),
                            str(source)], env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert not list((tmp_path / "site" / "shade_ops").glob("_C*"))
    # -S: no .pth files, so an editable install of this checkout cannot supply shade_ops._C
    code = ("import warnings, torch, shade_ops\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    y = torch.randn(6, 3)\n"
            "    values = [shade_ops.penalty(y, shade_ops.ShadeState(3)) for _ in range(2)]\n"
            "expected = shade_ops.reference.penalty(y, shade_ops.ShadeState(3))\n"
            "assert all(torch.equal(v, expected) for v in values)\n"
            "import json\n"
            "print(json.dumps([shade_ops.__file__, shade_ops.available_backends('cpu'),\n"
            "                  [str(w.message) for w in caught]]))\n")
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{site_packages}"})
    assert run.returncode == 0, run.stderr
    where, backends, messages = json.loads(run.stdout)
    assert where.startswith(str(tmp_path / "site")) and "cpu" not in backends
    assert len(messages) == 1 and "shade_ops._C is not built" in messages[0]
    assert "--no-build-isolation" in messages[0] and "reference backend" in messages[0]


@pytest.mark.slow
def test_an_error_in_csrc_fails_the_build_where_a_compiler_works(tmp_path):
    """Installing without the extension is for machines without a compiler: with one, a compile
    error fails the build, instead of reporting success over an earlier library."""
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "csrc"), source / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), source / "setup.py")
    (source / "shade_ops").mkdir()
    stale = source / "shade_ops" / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"an earlier build")
    broken = source / "csrc" / "autograd.cpp"
    broken.write_text("#error a deliberate error\n" + broken.read_text())
    build = subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
                           cwd=source, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "MAX_JOBS": "1"})
    assert build.returncode != 0, build.stdout + build.stderr
    assert "a deliberate error" in build.stdout + build.stderr


def test_an_empty_library_file_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "_C.so"
    path.write_bytes(b"")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: importlib.machinery.ModuleSpec(name, None, origin=str(path)))
    monkeypatch.setattr(importlib, "import_module", _must_not_load)
    module, why = _registry.load_native()
    assert module is None and why.startswith("shade_ops._C could not be read")

"""Builds shade_ops._C: the op schemas and the native CPU kernels, plus the CUDA kernels of csrc/*.cu
where torch has CUDA. A CPU-only torch builds the same package without the .cu files.

The extension is compiled against the torch of the environment that builds it, which must be the
torch that will run it (C++ extensions have no stable ABI across torch releases). So torch is not a
build requirement in pyproject.toml: pip's build isolation would fetch another torch (the newest,
with CUDA) to compile against. Install with ``pip install --no-build-isolation .`` into the
environment that has your torch; without it this file stops at once and says so
(docs/design.md, "Installing").

Environment variables:
    SHADE_OPS_NATIVE=0          portable code, no AVX flags (a wheel for other x86-64 machines)
    SHADE_OPS_ISA=avx2          cap the instruction set at AVX2
    SHADE_OPS_CUDA=0            leave out csrc/*.cu
    SHADE_OPS_NO_EXTENSION=1    install the pure-Python package (the reference backend) only
    SHADE_OPS_REQUIRE_EXTENSION=1   fail the install when the extension cannot be built for want of
                                a working compiler, instead of installing without it (an error
                                in csrc/ with a working compiler always fails the build)
"""
import glob
import os
import platform
import re
import subprocess
import sys
import tempfile

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pip's isolated build environment, or no torch yet
    torch = cpp_extension = None

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_TORCH_MESSAGE = """
shade_ops: torch cannot be imported while building, so shade_ops._C cannot be compiled against
the torch you will run it with. Either:
  - pip's build isolation hid your torch: install with
        pip install --no-build-isolation .        (or -e . for a checkout)
    which builds against the torch of this environment (it needs setuptools>=64, wheel and,
    for a fast build, ninja: pip install setuptools wheel ninja);
  - or torch is not installed yet: pip install torch (the CPU or CUDA build you want) first.
SHADE_OPS_NO_EXTENSION=1 installs the pure-Python package instead (the slow reference backend).
"""
# What pip runs to build a wheel or an editable install; dist_info (the wheel's metadata) comes
# before pip resolves and downloads the dependencies, so a build without torch stops before that.
BUILD_COMMANDS = {"dist_info", "build", "build_ext", "bdist_wheel", "editable_wheel", "develop",
                  "install", "bdist_egg"}
# The vector instruction sets the kernels are written for, best first: the CPU flags they need
# (as /proc/cpuinfo names them), the compiler flags (those ATen builds its own kernels of that
# level with) and a program that only compiles where the compiler has them.
ISAS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
               "__m512 x = _mm512_set1_ps(1.f); x = _mm512_fmadd_ps(x, x, x);"
               " return (int)_mm512_reduce_add_ps(x);"),
    "avx2": (("avx2", "fma", "f16c"),
             ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
             "__m256 x = _mm256_set1_ps(1.f); x = _mm256_fmadd_ps(x, x, x);"
             " return (int)_mm256_cvtss_f32(x);"),
}


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiles(flags: list[str], program: str) -> bool:
    """Whether the C++ compiler (CXX, else c++) builds ``program`` with ``flags``."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write(program)
        try:
            result = subprocess.run([compiler, *flags, source, "-o", os.path.join(tmp, "probe")],
                                    capture_output=True)
        except OSError:  # no compiler at all
            return False
        return result.returncode == 0


def _compiler_accepts(flags: list[str], body: str) -> bool:
    return _compiles(flags, "#include <immintrin.h>\nint main() { " + body + " }\n")


def _compiler_works() -> bool:
    """Whether the compiler builds a trivial program at all."""
    return _compiles([], "int main() { return 0; }\n")


def cpu_flags() -> list[str]:
    """-O3, plus the best of AVX-512 and AVX2 that this compiler and this CPU both have.

    Without them at::vec::Vectorized falls back to scalar code and the kernels run about half as
    fast; AVX-512 (16 lanes) is faster again. The flags target the building machine, like
    -march=native: build where you run (shade_ops checks the CPU before it loads the kernels, and
    falls back to the reference backend with a warning on a CPU without them).
    SHADE_OPS_NATIVE=0 builds without them, SHADE_OPS_ISA=avx2 caps the level at AVX2."""
    # No -std: torch's BuildExtension adds the standard its headers need (C++17 up to torch 2.13,
    # C++20 from 2.14) only when the flags name none.
    flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP, inline
    if os.environ.get("SHADE_OPS_NATIVE", "1") == "0" \
            or platform.machine() not in ("x86_64", "AMD64"):
        return flags
    names = list(ISAS)
    cap = os.environ.get("SHADE_OPS_ISA")
    if cap is not None:
        if cap not in ISAS:
            raise ValueError(f"SHADE_OPS_ISA must be one of {names}, got {cap!r}")
        names = names[names.index(cap):]
    host = _host_flags()
    for name in names:
        needed, isa_flags, probe = ISAS[name]
        if host.issuperset(needed) and _compiler_accepts(isa_flags[:-2], probe):
            return flags + isa_flags
    return flags


def cxx_standard(torch_version: str) -> str:
    """The -std flag for C++ that includes torch's headers outside BuildExtension (the Makefile's
    exp-ulp tool): C++20 from torch 2.14 on, which its headers require, C++17 before."""
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def build_info_flags(torch_version: str) -> list[str]:
    """The torch version the extension is built against, as a define that csrc/shade_ops.cpp
    writes into the library (shade_ops/_registry.py reads it from the file before loading it)."""
    if not re.fullmatch(r"[0-9A-Za-z.+_]+", torch_version):  # a token the preprocessor can quote
        torch_version = ".".join(torch_version.split(".")[:2])
    return [f"-DSHADE_OPS_TORCH_VERSION={torch_version}"]


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    extra = {"cxx": cpu_flags() + build_info_flags(torch.__version__)}
    with_cuda = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None \
        and cuda_sources and os.environ.get("SHADE_OPS_CUDA", "1") != "0"
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math"] + build_info_flags(torch.__version__)
        return cpp_extension.CUDAExtension("shade_ops._C", sources + cuda_sources,
                                           extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return cpp_extension.CppExtension("shade_ops._C", sources, extra_compile_args=extra,
                                      extra_link_args=["-fopenmp"])


def build_ext_class():
    """torch's BuildExtension (ninja), which installs without the extension when it cannot be
    compiled (no compiler, say): shade_ops then runs on its reference backend and says so."""

    class BuildExtension(cpp_extension.BuildExtension):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001  (any compiler or toolchain failure)
                # An error in csrc/ with a working compiler fails the build: installing without
                # the extension is for machines that cannot compile at all.
                if os.environ.get("SHADE_OPS_REQUIRE_EXTENSION") == "1" or _compiler_works():
                    raise
                if self.inplace:  # a library of an earlier build would load in its place
                    for stale in glob.glob(os.path.join(ROOT, "shade_ops", "_C.*")):
                        os.remove(stale)
                print(f"\nshade_ops: WARNING: the C++ extension shade_ops._C could not be built "
                      f"({type(error).__name__}: {error}).\nInstalling without it: shade_ops "
                      f"will run on its reference backend (correct, much slower). For the fused "
                      f"kernels, install a C++ compiler (g++) and reinstall with "
                      f"`pip install --no-build-isolation .`; SHADE_OPS_REQUIRE_EXTENSION=1 "
                      f"makes this an error.\n", file=sys.stderr)

    return BuildExtension


if __name__ == "__main__":  # pip and `python setup.py` both run it so; `import setup` does not
    if os.environ.get("SHADE_OPS_NO_EXTENSION") == "1":
        setup()
    elif torch is None:
        # The sdist needs no torch (python -m build --sdist runs egg_info and sdist in its
        # isolated environment); a build does, and stops here within seconds of starting.
        if BUILD_COMMANDS.intersection(sys.argv[1:]):
            sys.exit(NO_TORCH_MESSAGE)
        setup()
    else:
        setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_class()})

"""Builds shade_ops._C: the op schemas and the native CPU kernels, plus the CUDA kernels of csrc/*.cu
where torch has CUDA. A CPU-only torch builds the same package without the .cu files."""
import glob
import os
import platform
import subprocess
import tempfile

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
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


def _compiler_accepts(flags: list[str], body: str) -> bool:
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <immintrin.h>\nint main() { " + body + " }\n")
        result = subprocess.run([compiler, *flags, source, "-o", os.path.join(tmp, "probe")],
                                capture_output=True)
        return result.returncode == 0


def cpu_flags() -> list[str]:
    """-O3, plus the best of AVX-512 and AVX2 that this compiler and this CPU both have.

    Without them at::vec::Vectorized falls back to scalar code and the kernels run about half as
    fast; AVX-512 (16 lanes) is faster again. The flags target the building machine, like
    -march=native: build where you run. SHADE_OPS_NATIVE=0 builds without them,
    SHADE_OPS_ISA=avx2 caps the level at AVX2."""
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


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    extra = {"cxx": cpu_flags()}
    with_cuda = cpp_extension.CUDA_HOME is not None and _torch_has_cuda() and cuda_sources \
        and os.environ.get("SHADE_OPS_CUDA", "1") != "0"
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        return cpp_extension.CUDAExtension("shade_ops._C", sources + cuda_sources,
                                           extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return cpp_extension.CppExtension("shade_ops._C", sources, extra_compile_args=extra,
                                      extra_link_args=["-fopenmp"])


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None


if __name__ == "__main__":  # pip and `python setup.py` both run it so; `import setup` does not
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )

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
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _host_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def _compiler_accepts(flags: list[str]) -> bool:
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <immintrin.h>\nint main() { __m256 x = _mm256_set1_ps(1.f);"
                    " x = _mm256_fmadd_ps(x, x, x); return (int)_mm256_cvtss_f32(x); }\n")
        result = subprocess.run([compiler, *flags, source, "-o", os.path.join(tmp, "probe")],
                                capture_output=True)
        return result.returncode == 0


def cpu_flags() -> list[str]:
    """-O3, plus AVX2/FMA where this compiler and this CPU have them (SHADE_OPS_NATIVE=0: never).

    Without them at::vec::Vectorized falls back to scalar code and the kernels run about half as
    fast. The flags target the building machine, like -march=native: build where you run."""
    flags = ["-O3", "-std=c++17", "-fopenmp"]  # at::parallel_for is OpenMP, inline
    wanted = os.environ.get("SHADE_OPS_NATIVE", "1") != "0"
    if wanted and platform.machine() in ("x86_64", "AMD64") and _host_has_avx2() \
            and _compiler_accepts(AVX2_FLAGS[:3]):
        flags += AVX2_FLAGS
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


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

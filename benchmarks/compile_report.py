"""The GPU kernels compiled without a GPU (`gpu_check.py --compile-only`, `make triton-compat`):
ptxas registers, spills and vector loads of every kernel the penalty launches at given shapes."""
from __future__ import annotations

import os
import re
import sys
import time


def compile_report(shapes: list[tuple[int, ...]], dtypes: list[str],
                   arch: int = 90) -> list[dict]:
    """Compiles, with ptxas and no GPU, every kernel the forward, backward and update launch at
    `shapes`, and reports registers, spills and vector loads of each. Needs a process where Triton
    was imported without TRITON_INTERPRET=1; patches Triton's launch to compile only."""
    import subprocess as sp
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, tuple(grid), kernel))
        return kernel

    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_only
    from shade_ops import _triton
    from shade_ops._layout import units_view

    if _triton.INTERPRETED:
        raise RuntimeError("--compile-only needs Triton imported without TRITON_INTERPRET=1")
    _triton.INTERPRETED = True  # lets the launchers take CPU tensors: nothing is launched
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    report = []
    for shape in shapes:
        for dtype_name in dtypes:
            y = torch.empty(shape, dtype=getattr(torch, dtype_name))
            view, mu = units_view(y, 1), torch.zeros(2, shape[1])
            compiled.clear()
            start = time.monotonic()
            _triton.penalty_forward(view, mu, "mean")
            _triton.penalty_backward(torch.ones(()), view, mu, "mean")
            _triton.update_state(torch.ones(2, shape[1]), mu, torch.ones(4, shape[1]), 0.8)
            seconds = time.monotonic() - start
            for name, grid, kernel in compiled:
                ptx = kernel.asm["ptx"]
                entry = dict(shape=list(shape), dtype=dtype_name, kernel=name, grid=list(grid),
                             # 8- and 16-byte loads, pipelined ones (cp.async to shared memory)
                             # included
                             vector_loads=len(re.findall(r"ld\.global[.\w]*\.v[24]\.", ptx))
                             + len(re.findall(r"cp\.async\.c[ag]\.shared\.global.*, 0x(?:8|10)",
                                              ptx)),
                             async_copies=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
                             shared_bytes=kernel.metadata.shared,
                             scalar_loads=len(re.findall(r"ld\.global[.\w]*\.b(?:16|32|64) ",
                                                         ptx)),
                             seconds=round(seconds, 2))
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = sp.run([cuobjdump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
                found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", usage)
                if found:
                    entry["registers"], entry["stack"], entry["shared"] = map(int, found.groups())
                report.append(entry)
    return report



def print_report(report: list[dict], arch: int) -> None:
    """The report as one JSON document on stdout, and a readable summary on stderr."""
    import json

    import triton

    print(json.dumps(report, indent=1))
    print(f"compiled for sm_{arch} with Triton {triton.__version__}", file=sys.stderr)
    for entry in report:
        print(f"{'x'.join(map(str, entry['shape'])):>16} {entry['dtype']:>9} "
              f"{entry['kernel']:<30} grid {entry['grid'][0]:>7} "
              f"regs {entry.get('registers', '?'):>3} stack {entry.get('stack', '?'):>3} "
              f"shared {entry.get('shared_bytes', '?'):>6} "
              f"vector loads {entry['vector_loads']}", file=sys.stderr)

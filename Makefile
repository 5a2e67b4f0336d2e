# Two commands do everything on a fresh Linux machine with Python 3.11 and no GPU:
#   make demo   set up, build, train a small network with SHADE and run the quick reproduction
#   make test   set up, build, run the whole test suite (what .ci/run calls)
#
# The set-up pins the CPU build of torch (TORCH_SPEC); the package itself asks for a range, so on a
# GPU machine `pip install --no-build-isolation .` keeps the CUDA torch that is there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup build test test-fast demo bench bench-quick bench-percall gpu-check triton-compat exp-ulp \
	figures clean zoo-setup zoo

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" ninja numpy "setuptools>=64" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,experiments]"
	touch $(STAMP)

# (Re)build shade_ops._C in place: ninja only recompiles what changed.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest tests

# The suite without the two >2**31-element tests (each allocates several GB).
test-fast: build
	$(PY) -m pytest tests -m "not slow"

demo: build
	$(PY) -m shade_ops demo
	$(PY) -m shade_ops reproduce --quick --out-dir build/demo

# tests/conftest.py runs Triton through its interpreter where there is no GPU.

# Speed on this machine: the full suite of benchmarks/harness.py (penalty, ShadeReLU, a sweep over
# elements and units, the MLP and ResNet-20 training steps with and without SHADE; about 9
# minutes on two cores) into one results JSON, then its plots and summary.
# bench-quick: a handful of small cases in under a minute, into build/.
BENCH_JSON ?= benchmarks/results/bench_cpu_$(shell date -u +%Y-%m-%d).json
bench: build
	mkdir -p benchmarks/results
	$(PY) benchmarks/run.py --suite full --out $(BENCH_JSON)
	$(PY) benchmarks/plots.py $(BENCH_JSON) --out-dir benchmarks/results/plots

bench-quick: build
	mkdir -p build
	$(PY) benchmarks/run.py --suite quick --out build/bench_quick.json

# Per-call cost (issue 19; docs/benchmarks.md, "Per-call cost"), 2 threads: ShadeReLU and the
# penalty forward+backward against nn.ReLU at 4k-1M elements, each call timed alone, quiet and
# with another core spinning; the training steps of ResNet-18, ShuffleNet-v2 x0.5 and DenseNet-121
# (benchmarks/models.py) at batch 2 and 16 with SHADE on every ReLU against the plain step; then
# the summary against the goals (.md) and the breakdown of one 16k-element call (_profile.md).
# At most 7 minutes for the suite (its budget), about 8 in all.
PERCALL_JSON ?= benchmarks/results/percall_cpu_$(shell date -u +%Y-%m-%d).json
bench-percall: build
	mkdir -p benchmarks/results
	$(PY) benchmarks/run.py --suite percall --threads 2 --out $(PERCALL_JSON)
	$(PY) benchmarks/percall_report.py $(PERCALL_JSON) --out $(PERCALL_JSON:.json=.md)
	$(PY) benchmarks/percall_profile.py --threads 2 --out $(PERCALL_JSON:.json=_profile.md)

# On a CUDA machine with torch and Triton already installed (no network needed).
gpu-check:
	python benchmarks/gpu_check.py

# The kernels compiled for sm_90 (ptxas, no GPU) with the Triton of the H200 image (3.6) as well
# as CI's: a separate venv with the CPU torch of TORCH_SPEC and TRITON36_SPEC; fails on a kernel
# that does not compile or spills registers. Needs shade_ops._C built (make build).
TRITON36_SPEC ?= triton==3.6.0
VENV36 ?= .venv-triton36
COMPAT_DIR ?= build
COMPAT_TAG ?=
COMPAT_SHAPES := --shape 256x64x56x56 --shape 256x256x14x14 --shape 8192x4096 --shape 128x64x16x16 \
	--shape 128x64x8x8 --shape 5x100000x3 --shape 1x1 --shape 3x1x7 \
	--shape 300x2x3
triton-compat: build
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON36_SPEC)" numpy
	mkdir -p $(COMPAT_DIR)
	TRITON_INTERPRET=0 PYTHONPATH=. $(VENV36)/bin/python benchmarks/gpu_check.py --compile-only \
		--dtype float32 --dtype bfloat16 $(COMPAT_SHAPES) \
		> $(COMPAT_DIR)/compile_sm90_triton36$(COMPAT_TAG).json
	TRITON_INTERPRET=0 PYTHONPATH=. $(PY) benchmarks/gpu_check.py --compile-only \
		--dtype float32 --dtype bfloat16 $(COMPAT_SHAPES) \
		> $(COMPAT_DIR)/compile_sm90_triton_ci$(COMPAT_TAG).json

clean:
	rm -rf build shade_ops/*.so $(VENV) $(VENV36) $(ZOO_VENV) .pytest_cache .benchmarks

# The model zoo (tests/zoo): real torchvision, timm and transformers models with random weights,
# in a venv of their own, since the pinned CPU torch has no torchvision here: ZOO_TORCH_SPEC (a
# CUDA build, which runs on CPU) with timm and transformers. shade_ops goes into it built against
# that torch, from the sdist of a copy of the tracked sources (build/zoo-src), so that .venv's
# in-place build (shade_ops/_C*.so, build/temp*) is neither used nor overwritten; the tests run
# from build/zoo-run, where `import shade_ops` finds the installed copy only. `make zoo` writes
# the table to $(ZOO_OUT).md and .json.
ZOO_VENV ?= .venv-zoo
ZOO_PY := $(ZOO_VENV)/bin/python
ZOO_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ZOO_SPEC ?= timm==1.0.31 transformers==5.25.0
ZOO_OUT ?= benchmarks/results/zoo_$(shell date -u +%F)
ZOO_SRC := build/zoo-src
ZOO_DEPS := $(ZOO_VENV)/.deps
ZOO_STAMP := $(ZOO_VENV)/.installed

zoo-setup: $(ZOO_STAMP)

$(ZOO_DEPS):
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_PY) -m pip install --quiet $(ZOO_TORCH_SPEC) $(ZOO_SPEC) pytest ninja numpy "setuptools>=64" wheel
	touch $(ZOO_DEPS)

$(ZOO_STAMP): $(ZOO_DEPS) $(shell git ls-files shade_ops csrc setup.py pyproject.toml)
	rm -rf $(ZOO_SRC)
	mkdir -p $(ZOO_SRC)
	git ls-files -z | tar --null -T - -c | tar -x -C $(ZOO_SRC)
	cd $(ZOO_SRC) && $(abspath $(ZOO_PY)) setup.py --quiet sdist --dist-dir dist
	$(ZOO_PY) -m pip install --quiet --no-build-isolation --no-deps $(ZOO_SRC)/dist/shade_ops-*.tar.gz
	touch $(ZOO_STAMP)

zoo: $(ZOO_STAMP)
	mkdir -p build/zoo-run $(dir $(ZOO_OUT))
	cd build/zoo-run && HF_HUB_OFFLINE=1 SHADE_ZOO_OUT=$(abspath $(ZOO_OUT)) \
		$(abspath $(ZOO_PY)) -m pytest -p no:cacheprovider $(CURDIR)/tests/zoo

# The exhaustive accuracy check of the CPU kernels' exp (csrc/tools/exp_ulp.cpp), built with the
# flags setup.py gives the extension on this machine.
exp-ulp: $(STAMP)
	mkdir -p build
	c++ -O2 $$($(PY) -c "import setup, torch; print(setup.cxx_standard(torch.__version__))") $$($(PY) -c "import setup; print(*[f for f in setup.cpu_flags() if f != '-fopenmp'])") \
		$$($(PY) -c "from torch.utils import cpp_extension as c; print(*['-I' + p for p in c.include_paths()])") \
		csrc/tools/exp_ulp.cpp -o build/exp_ulp
	./build/exp_ulp

# Every figure and table of the README and docs/, under benchmarks/results with the tag
# FIGURES_TAG (today's date by default): the benchmarks and their plots on a quiet machine first,
# the Triton compile tables, then the paper's experiments, one thread each, FIGURES_JOBS of them
# side by side (about 90 minutes of CPU time; about 50 minutes of wall time on two idle cores).
FIGURES_TAG ?= $(shell date -u +%F)
FIGURES_TAG := $(FIGURES_TAG)
FIGURES_JOBS ?= 2
SHADE_OPS := $(PY) -m shade_ops
FIGURE_RUNS := figure-mnist figure-digits figure-architectures figure-mechanism figure-mnist-edges \
	figure-mnist-edge50
.PHONY: $(FIGURE_RUNS)
figures: build
	$(MAKE) bench BENCH_JSON=benchmarks/results/bench_cpu_$(FIGURES_TAG).json
	$(MAKE) triton-compat COMPAT_DIR=benchmarks/results COMPAT_TAG=_$(FIGURES_TAG)
	$(PY) benchmarks/triton_host_overhead.py --rounds 30 --calls 200 \
		--out benchmarks/results/triton_host_overhead_$(FIGURES_TAG).json
	$(MAKE) -j$(FIGURES_JOBS) FIGURES_TAG=$(FIGURES_TAG) $(FIGURE_RUNS)

# The experiments, longest first (make -j starts them in this order); each also alone.
$(FIGURE_RUNS): build
figure-mnist:
	$(SHADE_OPS) reproduce --threads 1 --tag $(FIGURES_TAG)-mnist
figure-digits:
	$(SHADE_OPS) reproduce --threads 1 --dataset digits-m --seeds 4 --epochs 25 --min-steps 400 \
		--betas 3e-4,1e-3,3e-3 --weight-decays 1e-4,1e-3,5e-3 --tag $(FIGURES_TAG)-digits
figure-architectures:
	$(SHADE_OPS) architectures --threads 1 --tag $(FIGURES_TAG)-mnist
figure-mechanism:
	$(SHADE_OPS) mechanism --threads 1 --tag $(FIGURES_TAG)-mnist
figure-mnist-edges:
	$(SHADE_OPS) reproduce --threads 1 --sizes 250,500 --regularizers dropout,shade \
		--betas 3e-4,1e-3 --dropouts 0.1,0.25 --tag $(FIGURES_TAG)-mnist-edges
figure-mnist-edge50:
	$(SHADE_OPS) reproduce --threads 1 --sizes 50 --regularizers shade --betas 1e-2,3e-2 \
		--tag $(FIGURES_TAG)-mnist-edge50

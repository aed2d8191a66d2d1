# Every target that needs Python calls `setup` first, so each works from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The development install pins the torch build that lies on this kind of machine; the package itself
# only asks for a range (pyproject.toml).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

SWEEP ?=
REPORT_ARGS ?=

.PHONY: setup test test-slow test-all run rank-report bench bench-gpu clean tiny-clip slurm-local

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

# The quick suite in two pytest-xdist worker processes (its tests share no files: each has its own tmp_path): on 2
# cores 11 min 11 s for 1928 tests on a slow draw of the machine, where 1896 took 10 min 48 s (9 min 26 s on the draw
# before; 6 min 28 s for 1853 on a faster one, against 10 min 14 s for 1714 in one process), as one worker runs while
# the other waits on a command it started. TEST_WORKERS=0 runs it in one
# process (pdb, or reading a failure's output in order).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider -n $(TEST_WORKERS)

test-slow: setup
	$(PY) -m pytest -q -m "slow" -p no:cacheprovider

test-all: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The main job on the embedded default: three recipes trained, evaluated and ranked.
run: setup
	$(PY) -m src.run -m loss=rf_lognorm,edm,eps_linear
	$(PY) -m src.ranking.report $(REPORT_ARGS)

rank-report: setup
	$(PY) -m src.ranking.report $(SWEEP) $(REPORT_ARGS)

bench: setup
	@for f in bench/bench_*.py; do [ $$f = bench/bench_gpu.py ] && continue; echo "== $$f"; $(PY) $$f || exit 1; done

# One GPU, under 6 minutes: the MM-DiT step with each throughput lever, diffusers' step, the GPU bootstrap;
# writes bench/results/gpu.md. BENCH_ARGS=--dry-run runs every configuration at tiny size on the CPU.
BENCH_ARGS ?=
bench-gpu: setup
	$(PY) bench/bench_gpu.py $(BENCH_ARGS)

# Named sweeps (sweeps/): make sweep-smoke | sweep-paper_embedded | sweep-backbones | sweep-paper_grid
sweep-%: setup
	$(PY) -m src.run +sweep=$* $(ARGS)

# The job list with training FLOPs and GPU-hours, launching nothing: make plan-paper_grid
plan-%: setup
	$(PY) -m src.plan +sweep=$* $(ARGS)

# A one-node SLURM cluster on this machine (Debian's slurm-wlm and munge; as root), for the slow SLURM tests.
slurm-local:
	scripts/slurm_local.sh start

tiny-clip: setup
	$(PY) -m src.text.train_tiny_clip

clean:
	rm -rf outputs multirun reports .cache .pytest_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

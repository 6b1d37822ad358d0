# mmhat: the two commands of the README.
#   make demo   set up .venv if needed, then train + evaluate Mask R-CNN/HAT-Net-T on toy data
#   make test   set up .venv if needed, then run the test suite
#   make test-compat   the same suite on the oldest supported stack (torch 2.1.2, numpy<2,
#                      mmcv 2.1.0 built for it) in .venv-compat: what mmdet 3.3 GPU users run;
#                      with the classification extra, so tests/cls/ (ImageNet via mmpretrain) run
#                      there, required (make test: not collected, no torchvision for torch 2.13)
#
# Set-up knobs (environment or make variables):
#   PYTHON=python3.11          interpreter for .venv
#   KEEP_TORCH=1               keep the torch already installed for $(PYTHON) (e.g. a CUDA build)
#   MMHAT_WHEELHOUSE=DIR       folder holding a prebuilt mmcv-2.1.0 wheel for your torch
#   MMHAT_CACHE=DIR            cache of built wheels (default ~/.cache/mmhat)
#   TORCH_INDEX_URL=URL        extra index for torch (https://download.pytorch.org/whl/cpu: CPU build)
#   WITH_CLS=1                 also mmpretrain + torchvision (ImageNet classification, tests/cls/);
#                              make test-compat sets it: its PyPI torch has a matching torchvision
# Test knobs: TEST_WORKERS=2 (test processes; 0: one), PYTEST_ARGS='-k ...'
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WITH_CLS ?= 0
STAMP := $(VENV)/.mmhat-installed$(if $(filter 1,$(WITH_CLS)),-cls)
PYTEST_ARGS ?=
# make test-compat: the oldest torch of the supported range, in a venv of its own
COMPAT_TORCH ?= 2.1.2
COMPAT_VENV ?= .venv-compat
# make test: test files spread over this many processes, one torch thread each (0: one process)
TEST_WORKERS ?= 2

export PYTHON VENV TORCH_VERSION KEEP_TORCH MMHAT_WHEELHOUSE MMHAT_CACHE TORCH_INDEX_URL WITH_CLS
# 2-core machines: OpenMP spin-waiting makes concurrent torch jobs ~100x slower.
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONWARNINGS ?= ignore:pkg_resources is deprecated:UserWarning

.PHONY: install demo test test-fast test-compat clean

install: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt requirements/runtime.txt requirements/tests.txt requirements/cls.txt tools/setup_env.sh
	bash tools/setup_env.sh
	touch $@

demo: $(STAMP)
	$(PY) tools/demo_toy.py

XDIST := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-compat:
	$(MAKE) test VENV=$(COMPAT_VENV) TORCH_VERSION=$(COMPAT_TORCH) WITH_CLS=1

clean:
	rm -rf $(VENV) $(COMPAT_VENV) work_dirs .pytest_cache

# Two entry points (README): `make demo` and `make test`. Both are idempotent on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORK   ?= work
DEMO_SEED ?= 7

.PHONY: setup system-deps demo test test-fast clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# DICOM tools the tests use (dciodvfy, DCMTK, Orthanc). Installed when missing and we are root;
# otherwise the tests that need them are skipped locally (never in CI, where they must exist).
system-deps:
	@if ! command -v dciodvfy >/dev/null || ! command -v storescu >/dev/null || ! command -v Orthanc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools dcmtk orthanc orthanc-dicomweb dcm2niix chromium chromium-driver >/dev/null) \
	      || echo "warning: could not apt-get install dicom3tools dcmtk orthanc orthanc-dicomweb dcm2niix chromium chromium-driver"; \
	  else echo "note: dicom3tools/dcmtk/orthanc missing and not root: tests that need them will be skipped"; fi; \
	fi

demo: setup
	$(PY) -m training.simulate --out $(WORK)/demo/study --subjects 1 --seed $(DEMO_SEED) --vendor siemens
	$(PY) -m app -i $(WORK)/demo/study/sub-000/dicom -o $(WORK)/demo/out
	@echo "results: $(WORK)/demo/out   truth: $(WORK)/demo/study/sub-000/truth"

test: setup system-deps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(WORK)

# The two user-facing commands: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 127.0.0.1
PORT   ?= 8000
DATA   ?= sample-datasets
STUDIES = $(DATA)/studies
DATASTORE ?= local
ORTHANC_PORT ?= 8042
# real CT test files (TotalSegmentator's sdist, fetched at test set-up only, never by the server)
REFERENCE_CT ?= build/reference_ct
BIN     = $(VENV)/bin
# 2 shared cores: never let OpenMP threads spin-wait (METHOD section 7).
export OMP_WAIT_POLICY ?= PASSIVE
# monailabel's launcher runs `python -m monailabel.main`: the venv must be first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: serve test test-all install sample-data dicomweb-deps reference-ct

install: $(VENV)/.installed

# Re-installs only when the pins change; a ready machine skips this in well under a second.
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

sample-data: $(DATA)/.ready

$(DATA)/.ready: $(VENV)/.installed
	$(BIN)/medlsam generate --out $(DATA) --count 12 --supports 5 --preset default --seed 0
	@touch $@

# Real CT studies with reference segmentations for tests/test_registration.py (skipped once fetched).
reference-ct: $(REFERENCE_CT)/.fetched.json

$(REFERENCE_CT)/.fetched.json: | $(VENV)/.installed
	$(BIN)/python scripts/fetch_reference_ct.py --out $(REFERENCE_CT) --quiet

# DICOMweb mode (docs/DICOMWEB.md): Orthanc + DICOMweb plugin, Chromium (apt), playwright-core (npm),
# dcmqi (PyPI); each is skipped when already installed.
dicomweb-deps: install
	@sh scripts/dicomweb-deps.sh $(BIN) tests/e2e

ifeq ($(DATASTORE),dicomweb)
serve: install sample-data dicomweb-deps
	$(BIN)/python scripts/dicomweb.py serve --data $(DATA) --storage build/orthanc \
		--orthanc-port $(ORTHANC_PORT) --host $(HOST) --port $(PORT)
else
serve: install sample-data
	@echo "MedLSAM MONAI Label server: http://$(HOST):$(PORT)/  (info: http://$(HOST):$(PORT)/info/)"
	$(BIN)/monailabel start_server --app apps/medlsam --studies $(STUDIES) --host $(HOST) --port $(PORT)
endif

# CI's suite: every test except those marked `slow` (the DICOMweb/OHIF browser run, fuzzing, kill-and-
# restart, Ray, benchmarks' smoke runs); under 30 min on a clean 2-core machine. `make test-all` runs all.
# Both fetch the real CT test files first (once; tests/test_registration.py).
test: install dicomweb-deps reference-ct
	MEDLSAM_REFERENCE_CT=$(abspath $(REFERENCE_CT)) $(BIN)/python -m pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS)

test-all: install dicomweb-deps reference-ct
	MEDLSAM_REFERENCE_CT=$(abspath $(REFERENCE_CT)) $(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS)

# Bootstrap: `make demo` runs the whole loop on synthetic data, `make test` runs the test suite.
# Both create .venv, install the CPU torch first (pinned by constraints.txt on every pip call),
# then the project with its dev extra.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
C := -c constraints.txt

.PHONY: demo test venv sysdeps unit faults bench bench-scaling segmenter model ensemble ct-model clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(C) torch==2.13.0
	$(PIP) install -q --disable-pip-version-check $(C) -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

sysdeps:
	bash scripts/install-system-deps.sh

demo: venv sysdeps
	$(VENV)/bin/dicom-fusion demo

test: venv sysdeps
	$(VENV)/bin/python -m pytest -q tests

# Retrain the packaged lesion segmenter (README "Segmentation") on its own cohort: seed 1, so none of
# the classifier's patients (seed 0) is among the ones it learned from. Run it before `make model`,
# whose lesion channel reads this segmenter.
segmenter: venv
	$(VENV)/bin/dicom-fusion synth --patients 300 --out var/segcohort --seed 1
	$(VENV)/bin/dicom-fusion segment train --cohort var/segcohort --out inference/default_segmenter \
		--report docs/segmentation-report --arch unet --folds 5 --seed 0

# Retrain the packaged model (README "Model"): synthetic cohort, 5-fold CV report, final checkpoint + card, and
# (train.toml `ensemble = true`) the fold ensemble in inference/default_model/ensemble/; then `make ensemble`.
model: venv
	$(VENV)/bin/dicom-fusion synth --patients 1000 --out var/cohort --seed 0
	$(VENV)/bin/dicom-fusion train --cohort var/cohort --config inference/default_model/train.toml \
		--out inference/default_model --report var/model-report

# The fold ensemble written by `make model` (train.toml `ensemble = true`): measured against the single network on
# a fresh seed (docs/model-report/ensemble.md; its members-disagree limit written into the card) and given its
# drift reference (README "Model", "Fold ensemble"); about a minute.
ensemble: venv
	$(VENV)/bin/dicom-fusion synth --patients 400 --out var/ensemble-cohort --seed 11
	$(VENV)/bin/dicom-fusion model compare --ensemble inference/default_model/ensemble/card.toml \
		--cohort var/ensemble-cohort --out docs/model-report --write-max-spread
	$(VENV)/bin/dicom-fusion synth --patients 400 --out var/drift-cohort --seed 4
	$(VENV)/bin/dicom-fusion model reference inference/default_model/ensemble/card.toml --cohort var/drift-cohort

# Train the packaged chest CT model (README "Model") on its own synthetic CT cohort (seed 2).
# 240 patients, 5 folds and 15 epochs at most (train.toml) keep the run within about 15 minutes on a
# shared 2-core CPU machine; one torch thread (OMP_NUM_THREADS=1): two threads spin on each other's
# barrier when the cores are shared, and the thread count is part of what reproduces the weights.
ct-model: venv
	$(VENV)/bin/dicom-fusion synth --patients 240 --out var/ct-cohort --seed 2 --modality CT
	OMP_NUM_THREADS=1 $(VENV)/bin/dicom-fusion train --cohort var/ct-cohort --config inference/ct_model/train.toml \
		--out inference/ct_model --report docs/ct-model-report

# The fault-injection suite at full strength (20 rounds); `make test` runs it with 3.
faults: venv sysdeps
	FAULT_ROUNDS=20 $(VENV)/bin/python -m pytest -q -p no:logging tests/faults

# Benchmarks print ratios against a reference run in the same invocation (not part of the tests).
# About 14 minutes on 2 cores (bench/priority.py ~2, bench/model_cache.py ~3 + ~2 with --ct, bench/stow.py ~1); smaller runs: make bench BENCH_INSTANCES=300 BENCH_MEMORY=2000 BENCH_STUDIES=10
BENCH_INSTANCES ?= 600
BENCH_MEMORY ?= 10000
BENCH_STUDIES ?= 20
BENCH_INFER_STUDIES ?= 64
BENCH_PRIORITY_NORMAL ?= 30
bench: venv sysdeps
	$(VENV)/bin/python bench/ingest.py --instances $(BENCH_INSTANCES) --memory $(BENCH_MEMORY)
	$(VENV)/bin/python bench/latency.py --studies $(BENCH_STUDIES)
	$(VENV)/bin/python bench/inference.py --studies $(BENCH_INFER_STUDIES)
	$(VENV)/bin/python bench/fhir_timeline.py
	$(VENV)/bin/python bench/priority.py --normal $(BENCH_PRIORITY_NORMAL)
	$(VENV)/bin/python bench/model_cache.py
	$(VENV)/bin/python bench/model_cache.py --ct
	$(VENV)/bin/python bench/stow.py

# End-to-end throughput with 1, 2, 4 worker processes on PostgreSQL + Redis (README "Scaling"); about 15
# minutes on 2 cores. A 16-core host with a GPU: make bench-scaling SCALING_WORKERS=1,2,4,8,16 SCALING_STUDIES=400
SCALING_WORKERS ?= 1,2,4
SCALING_STUDIES ?= 30
bench-scaling: venv sysdeps
	$(VENV)/bin/python bench/scaling.py --workers $(SCALING_WORKERS) --studies $(SCALING_STUDIES)
	$(VENV)/bin/python bench/scaling.py --workers $(SCALING_WORKERS) --studies $(SCALING_STUDIES) --io-threads 8

unit: venv
	$(VENV)/bin/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) var demo-output

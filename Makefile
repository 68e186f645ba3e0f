# bov: every target installs what it needs on first use (a local .venv).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Where no CUDA driver is present, pin the CPU wheel so pip never pulls CUDA packages.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

PRESET  ?= tiny
VARIANT ?= bov

RUNS  ?= $(or $(BOV_RUNS_DIR),runs)
STEPS ?= 30

AXIS    ?= bank_layers
# Optional for sweeps: SCALE= SEEDS= WORKERS= STUDY= STORAGE= BUDGET_STEPS=
SWEEP_ARGS = $(if $(SCALE),--scale $(SCALE)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(WORKERS),--workers $(WORKERS)) \
             $(if $(STUDY),--study $(STUDY)) $(if $(STORAGE),--storage $(STORAGE)) $(if $(BUDGET_STEPS),--steps $(BUDGET_STEPS))
OPTUNA_STORAGE = $(or $(STORAGE),$(BOV_OPTUNA_STORAGE),sqlite:///$(abspath $(RUNS))/optuna.db)

.PHONY: install test test-slow describe train sweep sweeps figures reproduce ui dashboard bench bench-train bench-infer gpu-check prepare generate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# an editable install cannot place this file (setup.py does for a wheel): `lm_eval --model bov` needs it
	cp bov-lm-eval.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	touch $(STAMP)

## Fast test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

## Slow cases only (marked @pytest.mark.slow).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## Print the resolved per-layer value plan, parameters and FLOPs of a preset/variant.
describe: $(STAMP)
	$(VENV)/bin/bov describe --preset $(PRESET) --variant $(VARIANT)

## Train one variant on the embedded corpus (tiny: about 6-8 minutes on 2 CPU cores, measured with the old AdamW recipe).
train: $(STAMP)
	$(VENV)/bin/bov train --preset $(PRESET) --variant $(VARIANT)

## The main job: an Optuna study over one axis (default bank_layers: 15 min on 2 CPU cores, measured with the old AdamW recipe).
## Re-running continues it; AXIS= picks another study under sweeps/ (`make sweeps` lists them).
sweep: $(STAMP)
	$(VENV)/bin/bov sweep $(AXIS) $(SWEEP_ARGS)

sweeps: $(STAMP)
	$(VENV)/bin/bov sweeps

## Tables and figures for every sweep in the MLflow store (STUDY= picks one): analysis/ notebooks,
## executed headlessly into results/<study>/; installs nbclient + ipykernel on first use.
figures: $(STAMP)
	$(PY) -c "import nbclient, ipykernel" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check -e '.[notebooks]'
	$(VENV)/bin/bov figures $(if $(STUDY),--study $(STUDY))

## Run a committed study again (STUDY= a folder under results/; SEEDS=0,1 and LEVELS=a,b: the seeds and levels to
## re-run, default all) in a scratch runs dir,
## and say per level whether it lands where the committed seeds allow (exit 1 when one does not).
reproduce: $(STAMP)
	$(VENV)/bin/bov reproduce $(STUDY) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(LEVELS),--levels $(LEVELS))

## Optuna dashboard on the study storage (http://127.0.0.1:8080); installs optuna-dashboard on first use.
dashboard: $(STAMP)
	$(PY) -c "import optuna_dashboard" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check -e '.[dashboard]'
	$(VENV)/bin/optuna-dashboard $(OPTUNA_STORAGE) --host 127.0.0.1 --port 8080

## MLflow UI on the embedded store (http://127.0.0.1:5000).
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath $(RUNS))/mlflow.db} --host 127.0.0.1 --port 5000

## Tokenize PRESET's corpus once (tokenizer + token streams under the cache), for every later run and sweep cell.
prepare: $(STAMP)
	$(VENV)/bin/bov prepare --preset $(PRESET) --variant $(VARIANT)

## Training throughput per variant, then cached inference (cache bytes vs analytic, decode speed); results/bench/.
bench: bench-train bench-infer

bench-train: $(STAMP)
	$(VENV)/bin/bov bench-train --preset $(PRESET) --steps $(STEPS)

## Continue PROMPT= from CKPT= (a last.ckpt under runs/) with cached decoding; NEW_TOKENS= (64).
generate: $(STAMP)
	$(VENV)/bin/bov generate --checkpoint "$(CKPT)" --prompt "$(PROMPT)" --max-new-tokens $(or $(NEW_TOKENS),64)

## Cache memory at 135m (allocation only) and prefill/decode tokens/s at tiny; results/bench/infer_*.md, vcache.json.
bench-infer: $(STAMP)
	$(VENV)/bin/bov bench-infer

## On one GPU, about 8 minutes, no network: matmul ceiling, attention kernels, decode equality, bf16 vs fp32,
## cache bytes (allocator vs formula), decode speed, 135m/780m tokens/s and MFU -> results/bench/gpu_<device>.{json,md}.
gpu-check: $(STAMP)
	$(VENV)/bin/bov bench-gpu

clean:
	rm -rf $(VENV) .pytest_cache

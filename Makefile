# One target per stage; every variable can be overridden: `make tokenizer DATA=/data/celeba NPROC=8`.
# Training targets pass --resume, so re-running a target continues where it stopped.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# CelebA root / image folder, or "procedural"
DATA       ?= procedural
# pipeline directory: tokenizer/, codes/, maskgit/, samples/, eval/
RUN        ?= runs/celeba
# train_tokenizer.py preset (tiny, small, celeba64)
TOK_PRESET ?= celeba64
# train_maskgit.py preset (tiny, celeba64)
MG_PRESET  ?= celeba64
# extra key=value overrides for the tokenizer, e.g. optim.steps=50000
TOK_ARGS   ?=
# extra key=value overrides for MaskGIT
MG_ARGS    ?=
# processes (GPUs) for accelerate launch
NPROC      ?= 1
# samples for FID
N          ?= 10000
SEED       ?= 0
# MaskGIT decoding steps
STEPS      ?= 8
# guidance weight w (conditional models only)
CFG        ?= 0
# reference split for FID
SPLIT      ?= val
RES        ?= 64
# Inception weights file (else $$FID_INCEPTION_WEIGHTS or the torch hub cache)
WEIGHTS    ?=
BENCH_ARGS ?= --quick
# bench/ladder.py: image folder / shared CelebA tarball folder, and extra flags (e.g. --setting gpu64)
LADDER_DATA ?= ../shared/data/celeba_align_89x109
LADDER_ARGS ?=

LAUNCH := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m accelerate.commands.launch --num_processes $(NPROC))
TOK := $(RUN)/tokenizer/checkpoint.pt
MG  := $(RUN)/maskgit/checkpoint.pt
WFLAG := $(if $(WEIGHTS),--weights $(WEIGHTS),)
REF := $(RUN)/eval/ref_$(SPLIT)_$(RES).npz

.PHONY: setup test demo tokenizer codes maskgit sample fid-ref fid rfid report celeba bench ladder

# Creates the virtual environment once; re-installs when pyproject.toml changes.
setup: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The house style is checked first (ruff, configured in pyproject.toml), then the test suite.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests

# The whole pipeline at tiny scale on built-in procedural faces (~10 minutes on 2 CPU cores).
demo: $(STAMP)
	$(PY) demo.py --run runs/demo

tokenizer: $(STAMP)
	$(LAUNCH) train_tokenizer.py --preset $(TOK_PRESET) --run-dir $(RUN)/tokenizer --resume \
		data.source=$(DATA) $(TOK_ARGS)

codes: $(STAMP)
	$(PY) pretokenize.py --tokenizer $(TOK) --out $(RUN)/codes

maskgit: codes
	$(LAUNCH) train_maskgit.py --preset $(MG_PRESET) --run-dir $(RUN)/maskgit --resume \
		--codes $(RUN)/codes --tokenizer $(TOK) $(MG_ARGS)

sample: $(STAMP)
	$(PY) sample.py --tokenizer $(TOK) --maskgit $(MG) --seed $(SEED) --steps $(STEPS) \
		--cfg $(CFG) --grid $(RUN)/samples_grid.png --num-images $(N) \
		--out-dir $(RUN)/samples

fid-ref: $(STAMP)
	$(PY) -m eval ref --data $(DATA) --split $(SPLIT) --resolution $(RES) \
		--out $(REF) $(WFLAG)

fid: $(STAMP)
	$(PY) -m eval score $(RUN)/samples --ref $(REF) --run-dir $(RUN)/eval --name generation $(WFLAG)

rfid: $(STAMP)
	$(PY) -m eval rfid --tokenizer $(TOK) --data $(DATA) --split $(SPLIT) \
		--resolution $(RES) --run-dir $(RUN)/eval $(WFLAG)

report: $(STAMP)
	$(PY) report.py --run $(RUN)

# The full CelebA-64 recipe, stage after stage (each stage resumable).
celeba: tokenizer maskgit sample fid-ref fid rfid report

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/bench_vq.py $(BENCH_ARGS)
	$(PY) bench/bench_loader.py $(BENCH_ARGS)
	$(PY) bench/bench_stage_two.py $(BENCH_ARGS)
	$(PY) bench/bench_fid.py $(BENCH_ARGS)
	$(PY) bench/bench_train.py $(BENCH_ARGS)
	$(PY) bench/ablation.py $(BENCH_ARGS)

# The paper's claim: tokenizer -> codes -> MaskGIT -> samples -> SWD (FID with the Inception weights)
# for every rung of the ablation ladder and two seeds; resumable (re-run to continue).
ladder: $(STAMP)
	$(PY) bench/ladder.py --data $(LADDER_DATA) $(LADDER_ARGS)

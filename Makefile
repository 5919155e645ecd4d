# One target per stage; every variable can be overridden: `make tokenizer DATA=/data/celeba NPROC=8`.
# Training targets pass --resume, so re-running a target continues where it stopped.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# CelebA root / image folder, or "procedural" (required by the targets that read images: no default, so
# the GPU recipe never trains on procedural faces by accident)
DATA       ?=
# pipeline directory: tokenizer/, codes/, maskgit/, samples/, eval/
RUN        ?= runs/celeba
# train_tokenizer.py preset (smoke, demo, tiny, small, celeba64; tokenizer/train_config.py)
TOK_PRESET ?= celeba64
# train_maskgit.py preset (smoke, demo, tiny, celeba64; transformer/config.py)
MG_PRESET  ?= celeba64
# extra key=value overrides for the tokenizer, e.g. optim.steps=50000
TOK_ARGS   ?=
# extra key=value overrides for MaskGIT
MG_ARGS    ?=
# processes (GPUs) for accelerate launch; optim.batch_size is per process (global = batch x NPROC x grad_accum);
# pretokenizing and sampling split their images over the processes (the same files for any NPROC)
NPROC      ?= 1
# samples for FID
N          ?= 10000
SEED       ?= 0
# MaskGIT decoding steps (empty: the number the model was trained with)
STEPS      ?=
# attribute condition, e.g. smiling=1,glasses=0, and guidance weight w (conditional models only)
ATTRS      ?=
CFG        ?= 0
# reference split for FID
SPLIT      ?= val
RES        ?= 64
# Inception weights file (else $$FID_INCEPTION_WEIGHTS or the torch hub cache)
WEIGHTS    ?=
BENCH_ARGS ?= --quick
# image folder (or folder of CelebA tarballs) of the benchmarks that read real images; empty: their
# default ($$BENCH_DATA)
BENCH_DATA ?=
# bench/ladder.py: its data (default BENCH_DATA) and extra flags (e.g. --setting gpu64)
LADDER_DATA ?= $(BENCH_DATA)
LADDER_ARGS ?=
# bench/decoding.py: held-out images at the model's resolution and extra flags (e.g. --steps 8 --samples 200)
REF_IMAGES  ?=
DECODING_ARGS ?=
# studio: address and port to serve on (binding other than 127.0.0.1 exposes the model, see README)
HOST       ?= 127.0.0.1
PORT       ?= 8000

# make splits words at spaces: a RUN with a space would become two arguments (or two paths); refuse it.
ifneq ($(words $(RUN)),1)
$(error RUN="$(RUN)" must be one path without spaces (make cannot pass it whole); use another path or a symlink)
endif

LAUNCH := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m accelerate.commands.launch --num_processes $(NPROC))
TOK := $(RUN)/tokenizer/checkpoint.pt
MG  := $(RUN)/maskgit/checkpoint.pt
WFLAG := $(if $(WEIGHTS),--weights $(WEIGHTS),)
BDATA := $(if $(BENCH_DATA),--data $(BENCH_DATA),)
CODES := $(RUN)/codes/codes.json
need_data = $(if $(DATA),,$(error DATA is not set: give DATA=/path/to/celeba (or DATA=procedural for a toy run)))
REF := $(RUN)/eval/ref_$(SPLIT)_$(RES).npz

.PHONY: setup test demo tokenizer codes maskgit sample fid-ref fid rfid report export celeba bench ladder decoding studio
# The stages depend on each other's files on disk: never run two at once (make -j).
.NOTPARALLEL:

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

# The whole pipeline at tiny scale on built-in procedural faces (about 9 minutes on 2 CPU cores, BENCHMARKS.md 6c).
demo: $(STAMP)
	$(PY) demo.py --run runs/demo

tokenizer: $(STAMP)
	$(need_data)
	$(LAUNCH) train_tokenizer.py --preset $(TOK_PRESET) --run-dir $(RUN)/tokenizer --resume \
		data.source=$(DATA) $(TOK_ARGS)

# Encoded once; again only when the tokenizer checkpoint is newer than the code files.
codes: $(CODES)
$(CODES): $(TOK) | $(STAMP)
	$(LAUNCH) pretokenize.py --tokenizer $(TOK) --out $(RUN)/codes
$(TOK):  # written by `make tokenizer`; pretokenize.py says so if it is missing

maskgit: $(CODES)
	$(LAUNCH) train_maskgit.py --preset $(MG_PRESET) --run-dir $(RUN)/maskgit --resume \
		--codes $(RUN)/codes --tokenizer $(TOK) $(MG_ARGS)

sample: $(STAMP)
	$(LAUNCH) sample.py --tokenizer $(TOK) --maskgit $(MG) --seed $(SEED) $(if $(STEPS),--steps $(STEPS),) \
		$(if $(ATTRS),--attrs $(ATTRS),) --cfg $(CFG) --grid $(RUN)/samples_grid.png --num-images $(N) \
		--out-dir $(RUN)/samples --overwrite

fid-ref: $(STAMP)
	$(need_data)
	$(PY) -m eval ref --data $(DATA) --split $(SPLIT) --resolution $(RES) \
		--out $(REF) $(WFLAG)

fid: $(STAMP)
	$(PY) -m eval score $(RUN)/samples --ref $(REF) --report-dir $(RUN)/eval --name generation $(WFLAG)

rfid: $(STAMP)
	$(need_data)
	$(PY) -m eval rfid --tokenizer $(TOK) --data $(DATA) --split $(SPLIT) \
		--resolution $(RES) --report-dir $(RUN)/eval $(WFLAG)

report: $(STAMP)
	$(PY) report.py --run $(RUN)

# Portable models (safetensors + config.json, EMA weights) in $(RUN)/export/{tokenizer,maskgit}.
export: $(STAMP)
	$(PY) export.py --tokenizer $(TOK) --maskgit $(MG) --out $(RUN)/export

# A local web page on RUN's checkpoints: sample, guide, inpaint, outpaint (`make studio RUN=runs/demo`).
studio: $(STAMP)
	$(PY) -m studio --run $(RUN) --host $(HOST) --port $(PORT)

# The full CelebA-64 recipe, stage after stage (each stage resumable).
celeba: tokenizer maskgit sample fid-ref fid rfid report

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/bench_vq.py $(BENCH_ARGS)
	$(PY) bench/bench_kmeans.py $(BENCH_ARGS)
	$(PY) bench/bench_families.py $(BENCH_ARGS)
	$(PY) bench/bench_loader.py $(BDATA) $(BENCH_ARGS)
	$(PY) bench/bench_stage_two.py $(BENCH_ARGS)
	$(PY) bench/bench_fid.py $(BDATA) $(BENCH_ARGS)
	$(PY) bench/bench_train.py $(BENCH_ARGS)
	$(PY) bench/ablation.py $(BDATA) $(BENCH_ARGS)

# The paper's claim: tokenizer -> codes -> MaskGIT -> samples -> SWD (FID with the Inception weights)
# for every rung of the ablation ladder and five seeds, paired by seed; resumable (re-run to continue).
ladder: $(STAMP)
	$(PY) bench/ladder.py $(if $(LADDER_DATA),--data $(LADDER_DATA),) $(LADDER_ARGS)

# Samplers x decoding steps on the run's trained models, SWD against held-out images REF_IMAGES (a folder
# at the model's resolution), settings chosen on one half of them and reported on the other.
decoding: $(STAMP)
	@test -n "$(REF_IMAGES)" || { echo "REF_IMAGES is not set: give REF_IMAGES=/path/to/held-out/images at the model's resolution" >&2; exit 2; }
	$(PY) bench/decoding.py --tokenizer $(TOK) --maskgit $(MG) --ref-images $(REF_IMAGES) --out $(RUN)/decoding $(DECODING_ARGS)

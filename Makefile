# Two entry points for a newcomer (README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo

.PHONY: demo test test-fast install clean calibration default-model default-model-folds save-training-state crossval-default-model container-test

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh --system-only
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/install.sh --python-only $(PY)
	touch $(STAMP)

# Builds a one-subject BIDS dataset from a T1w available offline, runs participant then group.
demo: $(STAMP)
	$(PY) scripts/make_demo_dataset.py $(DEMO)/bids
	$(VENV)/bin/bids_cadiff $(DEMO)/bids $(DEMO)/derivatives/cadiff participant -w $(DEMO)/work
	$(VENV)/bin/bids_cadiff $(DEMO)/bids $(DEMO)/derivatives/cadiff group
	@echo "demo outputs: $(DEMO)/derivatives/cadiff"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Builds the Dockerfile (CPU-only torch) with podman, or Docker where a daemon runs, and runs the
# image read-only as uid 1000: --version, participant, group, reports (docs/containers.md). Needs
# no venv. Where this machine cannot build or run containers the script exits 77 with the reason:
# reported here, not a failure.
container-test:
	@bash scripts/test_container.sh $(CONTAINER_TEST_ARGS); rc=$$?; \
	if [ $$rc -eq 77 ]; then echo "container-test: SKIPPED (reason above)"; exit 0; fi; exit $$rc

# The model card's calibration and QC figures (artifacts/calibration/README.md): the three fold
# models on the seven fstd subjects of ../shared/data, then the temperature and the QC reference.
# About 90 min on 2 CPU cores; the runs resume (finished subjects are kept in work/calibration).
ALL_FSTD := sub-01,sub-02,sub-03,sub-04,sub-05,sub-06,sub-07
calibration: $(STAMP)
	$(PY) scripts/calibration.py run --subjects $(ALL_FSTD) --out work/calibration/fold1
	$(PY) scripts/calibration.py run --model artifacts/crossval/fold2/cadiff-fold2.pt --subjects $(ALL_FSTD) --out work/calibration/fold2
	$(PY) scripts/calibration.py run --model artifacts/crossval/fold3/cadiff-fold3.pt --subjects $(ALL_FSTD) --out work/calibration/fold3
	$(PY) scripts/calibration.py registration --subjects $(ALL_FSTD) --out artifacts/calibration/registration.tsv
	$(PY) scripts/calibration.py summarise --registrations artifacts/calibration/registration.tsv \
	    --fold work/calibration/fold1 sub-01,sub-02 --fold work/calibration/fold2 sub-03,sub-04 \
	    --fold work/calibration/fold3 sub-05,sub-06,sub-07 --out-dir artifacts/calibration
	$(PY) scripts/calibration.py store --summary artifacts/calibration/summary.json --fold fold1 --model bids_cadiff/data/cadiff-default.pt
	$(PY) scripts/build_qc_reference.py maps --out work/qc/maps.tsv
	$(PY) scripts/build_qc_reference.py build --maps work/qc/maps.tsv --calibration artifacts/calibration/summary.json --fold fold1 --runs work/calibration/fold1

# The bundled default model (configs/default_model.toml), trained by cadiff-train on the seven fstd
# subjects and the 59 SynthSeg label maps of ../shared/data (artifacts/default_model_v2/README.md).
# Every run resumes where it stopped (--resume auto); registrations are cached in the work dir.
# default-model-folds: the three cross-validation folds (test subjects left out of everything;
# the validation subject is the highest-numbered training subject, fixed before any result).
V2 := work/default_model_v2
TRAIN := $(VENV)/bin/cadiff-train work/shared_bids/bids work/shared_bids/labels
TRAIN_THREADS ?= 2
TRAIN_OPTS := --config configs/default_model.toml --synth-label-maps work/shared_bids/label_maps \
	-w $(V2)/work --resume auto --nthreads $(TRAIN_THREADS)
work/shared_bids/labels/dataset_description.json: $(STAMP) scripts/shared_data_to_bids.py
	$(PY) scripts/shared_data_to_bids.py work/shared_bids

# Each run first takes back its committed resumable state (artifacts/default_model_v2/<run>,
# written by `make save-training-state`) when the work folder has nothing as far on.
# One fold: `make default-model-fold1`; TRAIN_LIMIT="--time-limit 2h30m" stops it with a
# checkpoint (every run of the make is limited alike). Two folds side by side on 2 cores, 1.24
# times the iterations of one at 2 threads (artifacts/default_model_v2/README.md):
#   make -j2 default-model-fold1 default-model-fold2 TRAIN_THREADS=1
SAVED := artifacts/default_model_v2
STATE := $(PY) scripts/training_state.py
FOLD1 := --participant-label 03 04 05 06 07 --val-participants 07
FOLD2 := --participant-label 01 02 05 06 07 --val-participants 07
FOLD3 := --participant-label 01 02 03 04 --val-participants 04
default-model-folds: default-model-fold1 default-model-fold2 default-model-fold3

default-model-fold%: work/shared_bids/labels/dataset_description.json
	$(STATE) restore $(SAVED)/fold$* $(V2)/fold$*
	$(TRAIN) $(V2)/fold$* $(TRAIN_OPTS) $(TRAIN_LIMIT) $(FOLD$*)

default-model: work/shared_bids/labels/dataset_description.json
	$(STATE) restore $(SAVED)/final $(V2)/final
	$(TRAIN) $(V2)/final $(TRAIN_OPTS) $(TRAIN_LIMIT)

# Cross-validation of the v2 folds (the model card's figures), once the three folds are trained:
# each fold's model scores all seven subjects, skull on and off, with every refinement candidate
# (fixed beforehand); per fold the candidate with the best mean Dice on the fold's other subjects
# is kept for its test subjects (scripts/crossval_nested.py). The multi-atlas baseline votes the
# fold's training subjects. Registrations are cached in work/evaluate; about 30 min per fold.
# Each fold's scores are a file of their own, made again only when its model.pt changes (a
# reinstall does not), so a finished fold can be scored while another still trains:
# `make artifacts/crossval_v2/fold1_all.tsv`.
CV2 := artifacts/crossval_v2
CV_REFINE := em=1,em05=0.5
CV_CANDIDATES := CA-Diff,CA-Diff + em,CA-Diff + em05
EVAL := $(PY) scripts/evaluate_default_model.py --work work/evaluate
TEST1 := sub-01,sub-02
TEST2 := sub-03,sub-04
TEST3 := sub-05,sub-06,sub-07
ATLASES1 := sub-03,sub-04,sub-05,sub-06,sub-07
ATLASES2 := sub-01,sub-02,sub-05,sub-06,sub-07
ATLASES3 := sub-01,sub-02,sub-03,sub-04
.SECONDEXPANSION:
$(CV2)/fold%_all.tsv: $$(wildcard $(V2)/fold$$*/model.pt) | $(STAMP)
	$(STATE) finished $(V2)/fold$*
	mkdir -p $(CV2)
	$(EVAL) --model $(V2)/fold$*/model.pt --test $(ALL_FSTD) --no-multiatlas --no-prior-alone \
	    --refine $(CV_REFINE) --out $(CV2)/fold$*_all.part.tsv
	mv $(CV2)/fold$*_all.part.tsv $@

$(CV2)/multiatlas_fold%.tsv: | $(STAMP)
	mkdir -p $(CV2)
	$(EVAL) --no-cadiff --test $(TEST$*) --atlases $(ATLASES$*) --out $(CV2)/multiatlas_fold$*.part.tsv
	mv $(CV2)/multiatlas_fold$*.part.tsv $@

crossval-default-model: $(foreach k,1 2 3,$(CV2)/fold$(k)_all.tsv $(CV2)/multiatlas_fold$(k).tsv)
	$(PY) scripts/crossval_nested.py --candidates "$(CV_CANDIDATES)" \
	    --fold $(CV2)/fold1_all.tsv $(TEST1) --fold $(CV2)/fold2_all.tsv $(TEST2) \
	    --fold $(CV2)/fold3_all.tsv $(TEST3) \
	    --baseline $(CV2)/multiatlas_fold1.tsv $(CV2)/multiatlas_fold2.tsv $(CV2)/multiatlas_fold3.tsv \
	    --out-dir $(CV2)
	$(PY) scripts/crossval_summary.py $(CV2)/fold1.tsv $(CV2)/fold2.tsv $(CV2)/fold3.tsv \
	    --out $(CV2)/crossval.tsv > $(CV2)/crossval_summary.txt

# The latest resumable checkpoint and the logs of every run started so far, into $(SAVED)
# (one place, overwritten; dropped once the model they lead to is final).
save-training-state:
	@for run in fold1 fold2 fold3 final; do \
	  if [ -d $(V2)/$$run/checkpoints ]; then $(STATE) save $(V2)/$$run $(SAVED)/$$run || exit 1; fi; \
	done

clean:
	rm -rf $(DEMO) .pytest_cache

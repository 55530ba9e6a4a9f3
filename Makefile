# Two commands for a fresh machine:  `make train`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/din_synthetic.yaml
DATA   := data/synthetic

.PHONY: setup train test data clean lint reproduce-movielens reproduce-zoo-movielens reproduce-zoo-synthetic reproduce-zoo-synthetic-4epochs peers

setup: $(VENV)/.installed

# torchrec goes in with --no-deps: its metadata asks for the GPU fbgemm-gpu, which would
# overwrite fbgemm-gpu-cpu. Its real dependencies are in pyproject.toml.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/python -c "import fbgemm_gpu, torchrec; print('torchrec', torchrec.__version__, 'fbgemm_gpu', fbgemm_gpu.__version__)"
	$(BIN)/python -m embedding.mba_cpp  # compiles the MBA C++ CPU kernel once (about a minute)
	$(BIN)/python -m trainer.models.gru  # and DIEN's GRU sequence kernel
	$(BIN)/python -c "from trainer.models import activations; activations.kernel()"  # and PReLU's and Dice's
	$(BIN)/python -c "from trainer.models import jagged; jagged.kernel()"  # and the jagged segment sum
	$(BIN)/python -c "from trainer.models import attention; attention.kernel()"  # and DIN's fused attention
	touch $@

data: setup $(DATA)/train/_SUCCESS

# Regenerated when the generator changes (its defaults define the default data).
$(DATA)/train/_SUCCESS: tools/generate.py
	$(BIN)/dinrec generate --out $(DATA)

# The demo run starts over each time (`dinrec train --config C --resume` continues a run instead).
RUN    ?= runs/din_synthetic
train: data
	rm -rf $(RUN)
	$(BIN)/dinrec train --config $(CONFIG) train.out_dir=$(RUN)

# DIN paper Table 3 on MovieLens-100K: RecBole's copy from the recbole wheel (downloaded, never
# installed), converted, then BaseModel / DIN / DIN+Dice over 3 seeds -> docs/results-movielens.md
ML_WHEEL := data/downloads/recbole-1.2.1-py3-none-any.whl

reproduce-movielens: setup data/movielens/convert.json
	$(BIN)/dinrec experiment movielens --data data/movielens --seeds 0,1,2 --out docs/results-movielens.md --plot docs/movielens-gauc.png

data/movielens/convert.json: $(ML_WHEEL)
	$(BIN)/python -m tools.convert.movielens $(ML_WHEEL) data/ml-100k
	$(BIN)/dinrec convert movielens --inter data/ml-100k/ml-100k.inter --item data/ml-100k/ml-100k.item \
		--user data/ml-100k/ml-100k.user --out data/movielens

# the model zoo on MovieLens-100K with profile and context features, one config per model, the
# epoch chosen on the validation users -> docs/results-zoo-movielens.md
reproduce-zoo-movielens: setup data/movielens-valid/convert.json
	$(BIN)/dinrec experiment zoo --config 'configs/zoo_movielens/{model}.yaml' --seeds 0,1,2 \
		--out docs/results-zoo-movielens.md --plot docs/zoo-movielens.png --runs runs/zoo_movielens

# the model zoo on the synthetic world with profile and context signal (configs/zoo_synthetic.yaml),
# the epoch chosen on new users of the same world -> docs/results-zoo.md
reproduce-zoo-synthetic: setup data/zoo/train/_SUCCESS
	$(BIN)/dinrec experiment zoo --config configs/zoo_synthetic.yaml --seeds 0,1,2 \
		--out docs/results-zoo.md --plot docs/zoo-synthetic.png --runs runs/zoo_synthetic

# the sequence models and BaseModel trained longer (4 epochs; the best epoch still chosen on valid/)
reproduce-zoo-synthetic-4epochs: setup data/zoo/train/_SUCCESS
	$(BIN)/dinrec experiment zoo --config configs/zoo_synthetic.yaml --models base,din,dien,mian --seeds 0,1,2 \
		train.epochs=4 --out docs/results-zoo-4epochs.md --plot docs/zoo-synthetic-4epochs.png \
		--runs runs/zoo_synthetic_4epochs

data/zoo/train/_SUCCESS: tools/generate.py
	$(BIN)/dinrec generate --out data/zoo --users 30000 --valid-users 10000 --profile 1.0 --context 1.0

# the same conversion with 15 % of the training users held out for validation (data.valid): the
# model zoo's MovieLens runs choose their hyper-parameters and best epoch on it; the test set is
# data/movielens's
data/movielens-valid/convert.json: $(ML_WHEEL)
	$(BIN)/python -m tools.convert.movielens $(ML_WHEEL) data/ml-100k
	$(BIN)/dinrec convert movielens --inter data/ml-100k/ml-100k.inter --item data/ml-100k/ml-100k.item \
		--user data/ml-100k/ml-100k.user --valid-fraction 0.15 --out data/movielens-valid

$(ML_WHEEL):
	$(VENV)/bin/pip download -q --no-deps recbole==1.2.1 -d data/downloads

# DeepCTR-Torch for `dinrec bench peers` only, outside the venv (tools/peers-requirements.txt)
peers: setup .peers/.installed

.peers/.installed: tools/peers-requirements.txt
	$(BIN)/pip install -q --no-deps --target .peers -r tools/peers-requirements.txt
	touch $@

# ruff first: a lint or format error fails in seconds, before the 15-minute suite
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data runs .peers

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

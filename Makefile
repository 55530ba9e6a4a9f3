# Two commands for a fresh machine:  `make train`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/din_synthetic.yaml
DATA   := data/synthetic

.PHONY: setup train test data clean lint

setup: $(VENV)/.installed

# torchrec goes in with --no-deps: its metadata asks for the GPU fbgemm-gpu, which would
# overwrite fbgemm-gpu-cpu. Its real dependencies are in pyproject.toml.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/python -c "import fbgemm_gpu, torchrec; print('torchrec', torchrec.__version__, 'fbgemm_gpu', fbgemm_gpu.__version__)"
	$(BIN)/python -m embedding.mba  # compiles the MBA C++ CPU kernel once (about a minute)
	$(BIN)/python -m trainer.models.gru  # and DIEN's GRU sequence kernel
	touch $@

data: setup $(DATA)/train/_SUCCESS

$(DATA)/train/_SUCCESS:
	$(BIN)/dinrec generate --out $(DATA)

train: data
	$(BIN)/dinrec train --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data runs

lint: setup
	$(BIN)/ruff check .

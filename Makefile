# stockdistill: the two quick-start commands are `make run` and `make test`.
# Both create (or reuse) the venv in $(VENV), install torch==2.13.0 FIRST (an unpinned torch would pull a
# multi-GB CUDA build; on a GPU box the same pin gets the regular wheel), then this package with its dev extras.

VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= quickstart
# the pretrained tiny student (its preset: LoRA r32/alpha 64, lr 3e-3, batch 8; 1.5 epochs here) on full 30-day prompts with the
# seed's MA5/MA10/MACD as a block before the bars (--context indicators); 48 windows a stock: 388 validation windows,
# of which 128 (spread over 2024) give the validation loss during training (--val-loss-limit; all 388 are answered and scored)
RUN_FLAGS ?= --context indicators --windows 48 --epochs 1.5 --val-loss-limit 128 --max-new-tokens 160 --gen-batch-size 66 --overwrite
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test install bench run-flags

install: $(STAMP)

$(STAMP): setup.py settings.ini
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@# a CJK font so matplotlib draws Chinese (best effort: needs root and Debian's registry)
	@if ! fc-list 2>/dev/null | grep -qi wqy && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q fonts-wqy-microhei >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q fonts-wqy-microhei >/dev/null 2>&1)) || echo "note: fonts-wqy-microhei not installed; Chinese in plots may show as boxes"; fi
	@touch $@

# The main job: the whole distillation on the embedded defaults (bundled bars, rule teacher, tiny student).
run: $(STAMP)
	$(BIN)/stockdistill distill --run-name $(RUN) $(RUN_FLAGS)

# The tests, in order: library in sync with the notebooks, lint, notebook tests, pytest (two workers, as the notebook
# tests: on the 2-core CI machine 620 s instead of 770 s, 302 tests, pytest-xdist).
test: $(STAMP)
	@before=$$(git status --porcelain -- stockdistill nbs | sort; git diff -- stockdistill nbs | sha1sum); \
	  $(BIN)/nbdev_export && $(BIN)/nbdev_clean && \
	  after=$$(git status --porcelain -- stockdistill nbs | sort; git diff -- stockdistill nbs | sha1sum); \
	  if [ "$$before" != "$$after" ]; then echo "FAIL: nbdev_export/nbdev_clean changed files: the library is out of sync with the notebooks"; \
	    git status --short -- stockdistill nbs; exit 1; fi; echo "ok: notebooks and library in sync"
	$(BIN)/ruff check stockdistill tests bench
	cd nbs && ../$(BIN)/nbdev_test --n_workers 2 --timing
	$(BIN)/pytest tests -q -n 2

bench: $(STAMP)
	bash bench/pipeline.sh

run-flags:
	@echo $(RUN_FLAGS)

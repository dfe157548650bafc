# The two set-up commands of the README: `make book` and `make test`.
# Each creates .venv/ (installing with constraints.txt) if it is missing, then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test bench venv clean check-book

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(BIN)/unifieddelta book $(if $(PROFILE),--profile $(PROFILE))

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# After `make book`: headless Chromium opens the built index and two chapters (math rendered, images loaded, no
# traceback). Needs Debian's chromium (`apt-get install chromium`); fails, rather than skips, without it.
check-book: $(STAMP)
	UNIFIEDDELTA_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -rs tests/test_book.py -k built_book

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf _build book/generated

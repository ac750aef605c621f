# Both targets create .venv and install MER and what it needs into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@echo "compiling the kernels (numba caches them; the first time takes a minute or two)"
	$(VENV)/bin/python -c "from mer_pipeline.kernels import warmup; warmup()"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mer run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/mer bench kernel

clean:
	rm -rf $(VENV) build *.egg-info

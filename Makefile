# One command for the demo, one for the tests; both build their own virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
# pip's torch==2.13.0 is the CPU build on our machines; on others point TORCH_SPEC at the build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) -m convforever.peer.local_swarm

test: install
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache

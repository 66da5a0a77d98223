# The two commands of the README:  `make run`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test install system-deps lint bench fuzz clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Start the EIR on the embedded store: S13 on TCP 3868, N5g-eir (h2c) on 8080, metrics on 9868.
run: install
	$(VENV)/bin/eir-server serve --http-listen 0.0.0.0:8080 $(ARGS)

## Install what the tests need (redis-server, tshark), lint, type-check, run the whole suite.
test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict eir_server/diameter eir_server/s13 eir_server/policy eir_server/service.py \
	  eir_server/n5g_eir
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

system-deps:
	@scripts/system-deps.sh

## The benchmark suite: benchmarks/results/latest.{json,md}, plots, and the README table.
## PROFILE=quick (~10 min on 2 cores) or full; SUITES="ecr otp" runs some suites only;
## BENCH_ARGS="--provisional 'why'" marks the results as provisional.
PROFILE ?= full
SUITES ?=
bench: install system-deps
	$(PY) -m benchmarks.suite --profile $(PROFILE) $(foreach s,$(SUITES),--suite $(s)) \
		--out benchmarks/results/latest.json --readme $(BENCH_ARGS)

## Coverage-guided fuzzing (atheris), not in CI: S13 (framing, decoders, connection, S13 parse)
## and N5g-eir (HPACK, HTTP/2 connection, router), FUZZ_SECONDS each. New inputs go to
## .fuzz/corpus and .fuzz/corpus-n5g, crashing inputs to .fuzz/crashes/ (exit status 1 then).
FUZZ_SECONDS ?= 600
fuzz: install
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q 'atheris>=2.3'
	mkdir -p .fuzz/corpus .fuzz/corpus-n5g .fuzz/crashes
	$(PY) fuzz/fuzz_s13.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=.fuzz/crashes/ .fuzz/corpus fuzz/seeds
	$(PY) fuzz/fuzz_n5g.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=.fuzz/crashes/n5g- .fuzz/corpus-n5g fuzz/seeds_n5g

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis .fuzz

# The two commands of the README:  `make run`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test test-compiled install system-deps lint bench fuzz clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Start the EIR on the embedded store: S13 on TCP 3868, N5g-eir (h2c) on 8080, metrics on 9868.
run: install
	$(VENV)/bin/eir-server serve --http-listen 0.0.0.0:8080 $(ARGS)

## Install what the tests need (redis-server, tshark), lint, type-check, run the whole suite on
## the sources, then the request path's tests on the compiled build (test-compiled).
test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict eir_server/diameter eir_server/s13 eir_server/policy eir_server/service.py \
	  eir_server/n5g_eir eir_server/checker.py eir_server/recent.py eir_server/overload.py \
	  eir_server/obs/audit.py eir_server/io/diameter_server.py eir_server/io/http_server.py \
	  eir_server/store
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-compiled

## The mypyc build (setup.py, EIR_MYPYC=1), built in a copy of the tree (build/compiled) so the
## sources here stay what runs; then the tests of what it compiles, run against it.
COMPILED_TREE := build/compiled
COMPILED_TESTS ?= tests/test_compiled.py tests/diameter tests/diameter_io tests/policy \
	tests/n5g_eir tests/obs/test_audit.py tests/obs/test_operations_truth.py tests/test_recent.py \
	tests/test_overload_signal.py tests/test_end_to_end.py tests/store
test-compiled: install system-deps
	scripts/compiled-tree.sh $(COMPILED_TREE) $(PY)
	cd $(COMPILED_TREE) && EIR_EXPECT_COMPILED=1 $(abspath $(VENV))/bin/pytest -q $(COMPILED_TESTS)

system-deps:
	@scripts/system-deps.sh

## The benchmark suite: benchmarks/results/latest.{json,md}, plots, and the README table.
## PROFILE=quick (~10 min on 2 cores) or full; SUITES="ecr otp" runs some suites only (a
## partial or failed run writes benchmarks/results/unrecorded/, never the recorded results);
## BENCH_ARGS="--provisional 'why'" marks the results as provisional. COMPILED=1 measures the
## mypyc build, as the Docker image ships it rather than the sources: built in build/compiled (as
## by test-compiled) and the suite run from there, so that it and every eir-server it starts
## import the extensions; results and README stay here. The results name the build, and
## --expect-build stops the suite rather than file figures under the wrong one.
PROFILE ?= full
SUITES ?=
COMPILED ?=
bench_compiled = $(filter 1,$(COMPILED))
bench: install system-deps
	$(if $(bench_compiled),scripts/compiled-tree.sh $(COMPILED_TREE) $(PY))
	cd $(if $(bench_compiled),$(COMPILED_TREE),.) && $(abspath $(PY)) -m benchmarks.suite \
		--profile $(PROFILE) $(foreach s,$(SUITES),--suite $(s)) \
		--expect-build $(if $(bench_compiled),mypyc,python) \
		--out $(CURDIR)/benchmarks/results/latest.json --readme $(CURDIR)/README.md $(BENCH_ARGS)

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
	rm -rf $(VENV) build .pytest_cache .ruff_cache .mypy_cache .hypothesis .fuzz

# Benchmarks (benchmarks/, docs/performance.md). Included by the root Makefile (`-include mk/*.mk`).
#
#   make bench                          every section at its default size (about 30 minutes on an idle 2-core box)
#   make bench-quick                    every section at smoke-test size (a few minutes)
#   make bench BENCH_ONLY=train,data    some sections
#   make bench BENCH_OUT=build/bench/mine.jsonl
#
# Each figure is one JSON line on stdout and in BENCH_OUT; the readable tables come at the end.
BENCH_OUT ?= build/bench/results.jsonl
BENCH_ONLY ?= train,memory,data,pipeline,distributed

.PHONY: bench bench-quick

bench: setup ## run the benchmarks (throughput vs the SFTTrainer recipe, memory, data stages, pipeline overhead, scaling out)
	$(PY) -m benchmarks.run_all --only $(BENCH_ONLY) --out $(BENCH_OUT)

bench-quick: setup ## the benchmarks at smoke-test size (a few minutes; figures are indicative only)
	$(PY) -m benchmarks.run_all --quick --only $(BENCH_ONLY) --out $(basename $(BENCH_OUT))-quick.jsonl

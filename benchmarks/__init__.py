"""kubetune's benchmarks: training throughput against the classic SFTTrainer recipe, LoRA vs QLoRA memory, data
stage throughput, local pipeline overhead, and a prepared GPU QLoRA comparison.

Run them with ``make bench`` (or ``python -m benchmarks.run_all``; ``--quick`` for a two-minute smoke run). Every
figure is one JSON line on stdout (and in ``--out``); a readable table follows at the end. Each measured run is its
own subprocess, so its peak RSS is its own. Results and how to read them: docs/performance.md.
"""

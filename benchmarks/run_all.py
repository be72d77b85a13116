"""Every benchmark in one invocation (what ``make bench`` runs): JSON lines as they come, all tables at the end.

    python -m benchmarks.run_all [--quick] [--only train,memory,data,pipeline,distributed] [--out FILE]

Sections run one after another (never two at once: they would compete for the same cores). A section that fails
is reported and the others still run; the exit code is 1 if any failed. Options not listed here keep each
section's defaults; run a section's own module (``python -m benchmarks.train_throughput --help``) to change them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import common, data_stages, distributed, memory, pipeline_overhead, train_throughput
from benchmarks.common import BenchError, Recorder, progress

SECTIONS = {
    "train": train_throughput,
    "memory": memory,
    "data": data_stages,
    "pipeline": pipeline_overhead,
    "distributed": distributed,
}


def main(argv=None) -> int:
    common.quiet_libraries()
    common.exit_on_sigterm()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every section at smoke-test size (about 2-3 minutes)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch folders")
    p.add_argument("--verbose", action="store_true", help="show the workers' logs")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("")
    rec = Recorder(out=args.out)
    rec.emit(common.environment())
    shared = [a for a, on in (("--quick", args.quick), ("--keep", args.keep), ("--verbose", args.verbose)) if on]
    outputs: list[str] = []
    failed: list[str] = []
    t0 = time.perf_counter()
    for name in chosen:
        module = SECTIONS[name]
        started = time.perf_counter()
        section_args = module.parse_args(shared)
        try:
            records = module.run(section_args, rec)
        except BenchError as err:
            progress(f"{name}: FAILED: {err}")
            rec.emit({"bench": name, "name": "FAILED", "error": str(err).splitlines()[0]})
            failed.append(name)
            continue
        progress(f"{name}: done in {time.perf_counter() - started:.0f} s")
        if name == "train":
            records = records + [r for r in rec.records if r["bench"] == "peak"]
        outputs.append(module.tables([dict(r) for r in records]))
    env = rec.records[0]
    print(f"\n## kubetune benchmarks ({env['date']}, {time.perf_counter() - t0:.0f} s)\n")
    print(f"- machine: {env['cpu']}, {env['cores']} cores usable, {env['memory_gib']} GiB, AMX: {fmt_bool(env['amx'])}")
    print(f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}")
    print(f"- command: `{env['command']}`")
    print(f"- load average at the end: {' '.join(f'{x:.2f}' for x in common.load_avg())}")
    for out in outputs:
        print(out)
    if failed:
        print(f"\nFAILED sections: {', '.join(failed)}")
    return 1 if failed else 0


def fmt_bool(v: bool) -> str:
    return "yes" if v else "no"


if __name__ == "__main__":
    raise SystemExit(main())

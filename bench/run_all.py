"""Run every benchmark in turn (``make bench``) and collect their tables into the README's Benchmarks section.

    .venv/bin/python bench/run_all.py                 # all (about 1.5 h on 2 CPU cores, minutes on a GPU)
    .venv/bin/python bench/run_all.py --only cost,layerwise_memory
    .venv/bin/python bench/run_all.py --readme-only   # just re-collect bench/results/*.md into the README

Each script runs in its own process and writes ``bench/results/<name>.md`` and ``.json`` (machine, versions,
protocol, medians/ratios against a baseline measured in the same run). The README section between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced by the tables found in ``bench/results/``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
SCRIPTS = {  # name -> (script, results files it writes)
    "quality": ("quality.py", ["quality", "quality_121m", "quality_previous"]),
    "cost": ("cost.py", ["cost", "cost_gpu"]),
    "layerwise_memory": ("layerwise_memory.py", ["layerwise_memory"]),
    "zo_agreement": ("zo_agreement.py", ["zo_agreement"]),
    "deploy_speed": ("deploy_speed.py", ["deploy_speed"]),
    "gguf_alignment": ("gguf_alignment.py", ["gguf_alignment"]),
    "gguf_tolerance": ("gguf_tolerance.py", ["gguf_tolerance"]),
    "reexpressed_families": ("reexpressed_families.py", ["reexpressed_families"]),
    "vllm_check": ("vllm_check.py", ["vllm_check"]),  # needs `make vllm`; says so and writes nothing without it
}
ORDER = ["quality", "cost", "layerwise_memory", "zo_agreement", "deploy_speed", "gguf_alignment", "gguf_tolerance",
         "vllm_check", "reexpressed_families"]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def run(name: str) -> bool:
    script = HERE / SCRIPTS[name][0]
    t0 = time.perf_counter()
    print(f"== {name}: {script.name}", flush=True)
    code = subprocess.call([sys.executable, str(script)], cwd=HERE)
    print(f"== {name}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
    return code == 0


def demote(md: str) -> str:
    """A results file as a README subsection: its title one level down, a link to the file."""
    return re.sub(r"^# ", "### ", md, count=1, flags=re.M)


def collect() -> str:
    parts = []
    for name in ORDER:
        for stem in SCRIPTS[name][1]:
            path = HERE / "results" / f"{stem}.md"
            if path.exists():
                parts.append(demote(path.read_text().strip()) + f"\n\n(`bench/results/{stem}.md`, from "
                             f"`bench/{SCRIPTS[name][0]}`)")
    return "\n\n".join(parts)


def update_readme() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} section to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{collect()}\n{END}{tail}")
    print(f"README.md benchmarks section updated from {HERE / 'results'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(ORDER))
    ap.add_argument("--readme-only", action="store_true")
    args = ap.parse_args()
    failed = []
    if not args.readme_only:
        names = args.only.split(",") if args.only else ORDER
        unknown = set(names) - set(SCRIPTS)
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {ORDER}")
        failed = [n for n in names if not run(n)]
    update_readme()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

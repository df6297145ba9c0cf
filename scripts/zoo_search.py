#!/usr/bin/env python
"""The zoo's defaults search: a learning-rate grid around each PEFT method's shipped lr, on dev,
over seeds, and which lr is clearly better (`reports/tables/search.py` says what that means).

    python scripts/zoo_search.py run --out outputs/zoo-search --seeds 1 2        # every method
    python scripts/zoo_search.py run --out outputs/zoo-search --methods lora vera --parallel 2
    python scripts/zoo_search.py run --out outputs/zoo-search --knob --seeds 1 2  # the knobs
    python scripts/zoo_search.py summarise outputs/zoo-search --out docs/zoo-search

`run` launches, for each method and seed, one multirun of `train.py experiment=zoo` over the
method's grid (`--factors` times the lr in `conf/peft/<method>.yaml`, 3 significant digits) into
`<out>/<method>/seed<s>` (another set of factors, say a point past the edge the best lr sat on,
into `seed<s>-x10`), and marks it `done` when the multirun succeeds: a rerun skips what is
done, so a crashed search resumes where it stopped. What follows `--` is passed to every run;
without it the runs use the search budget `BUDGET` (scale=cpu's 2,000 examples a task, one epoch,
dev on a fixed 1,000 a task). `--parallel N` runs N multiruns side by side, each with
cores // N threads (more throughput on a small CPU; the runs' examples/s then is not the zoo's).
`<out>/search.json` records each method's shipped lr and grid at launch, so a summary made after
the defaults change still compares against what was shipped.

`peft=frozen` trains only the heads, so its grid is their lr: its runs add `trainer.head_lr=null`
(else the heads learn at head_lr and the grid's peft.lr is refused as a conflict).

`run --knob` searches each method's one key knob instead (`KNOBS`: rank, reduction factor,
virtual tokens; none for bitfit, ia3, none and frozen): the values beside the default, at the
method's lr now in `conf/peft`, into `<out>/<method>/seed<s>-<knob>`; the default's runs are the
lr grid's at that lr, so run the grid (`--factors 1` at least) on the same seeds first.

`summarise` writes `search.md`, `search.csv` and `search.png` (and `knobs.md/csv/png` where knobs
ran) and prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

FACTORS = [0.3, 1.0, 3.0]
BUDGET = ["data.limit_train=2000", "trainer.epochs=1", "data.limit_eval=1000", "logger=none",
          "progress=false"]
PLAN = "search.json"
# frozen trains only the heads: its grid is their lr, which trainer.head_lr (1e-3) sets unless null
METHOD_OVERRIDES = {"frozen": ["trainer.head_lr=null"]}
# Each method's one key knob: its peft.* key and the values tried beside conf/peft's default.
KNOBS = {
    **{m: ("rank", [4, 16]) for m in ("lora", "dora", "lora_fa", "pissa", "qlora", "galore",
                                      "gradnormlorp")},
    "vera": ("rank", [64, 1024]), "dvora": ("rank", [64, 1024]),
    "dylora": ("r_max", [4, 16]), "adalora": ("target_r", [4, 12]),
    "hydra": ("r_parallel", [4, 16]), "peft": ("config.r", [4, 16]),
    "houlsby": ("reduction_factor", [8, 32]), "pfeiffer": ("reduction_factor", [8, 32]),
    "prefix": ("num_virtual_tokens", [10, 50]), "prompt": ("num_virtual_tokens", [10, 50]),
}


def methods() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "peft").glob("*.yaml"))


def shipped(method: str, key: str = "lr") -> float:
    """A setting of the method as `conf/peft/<method>.yaml` ships it (`lr`, `rank`, `config.r`)."""
    return float(OmegaConf.select(OmegaConf.load(REPO / "conf" / "peft" / f"{method}.yaml"), key))


def grid(lr: float, factors: list[float]) -> list[str]:
    return [f"{lr * f:.3g}" for f in factors]


def load_plan(out: Path, budget: list[str]) -> dict:
    """`<out>/search.json`, or a new plan; refused where it was searched with another budget."""
    path = out / PLAN
    plan = json.loads(path.read_text()) if path.is_file() else {"methods": {}}
    plan.setdefault("budget", budget)
    if plan["budget"] != budget:
        raise SystemExit(f"error: {path} was searched with {plan['budget']}, not {budget}: "
                         "use another --out or the same overrides")
    return plan


def save_plan(out: Path, plan: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    partial = (out / PLAN).with_suffix(f".{os.getpid()}.tmp")  # whole or not at all: two
    partial.write_text(json.dumps(plan, indent=2) + "\n")  # searches into one folder may write
    os.replace(partial, out / PLAN)


def record_plan(out: Path, chosen: list[str], factors: list[float], budget: list[str]) -> dict:
    """Adds the methods' shipped lr and grid to `<out>/search.json`; a method already there keeps
    its record (the lr it shipped with when its search began)."""
    plan = load_plan(out, budget)
    for m in chosen:
        record = plan["methods"].setdefault(m, {"shipped_lr": shipped(m), "grid": []})
        record["grid"] += [lr for lr in grid(record["shipped_lr"], factors)
                           if lr not in record["grid"]]
    save_plan(out, plan)
    return plan


def record_knobs(out: Path, chosen: list[str], budget: list[str]) -> dict:
    """Adds each method's knob (name, default, values, the lr now shipped) to `search.json`; a
    method already there keeps its default and lr."""
    plan = load_plan(out, budget)
    for m in chosen:
        name, values = KNOBS[m]
        record = plan.setdefault("knobs", {}).setdefault(m, {
            "name": name, "default": shipped(m, name), "lr": shipped(m), "values": []})
        record["values"] += [v for v in values if v not in record["values"]]
    save_plan(out, plan)
    return plan


def folder_of(out: Path, method: str, seed: int, factors: list[float]) -> Path:
    """`<out>/<method>/seed<s>` for the default grid, `.../seed<s>-x10` for another (an edge)."""
    tag = "" if factors == FACTORS else "-x" + "_".join(f"{f:g}" for f in factors)
    return out / method / f"seed{seed}{tag}"


def launch(method: str, seed: int, sweep: list[str], folder: Path, budget: list[str],
           threads: int) -> str:
    """One multirun of the zoo for a method and seed over `sweep` (`peft.lr=a,b`), into folder;
    skipped where it is marked done."""
    if (folder / "done").is_file():
        return f"{method} seed {seed}: done before"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "experiment=zoo", f"peft={method}",
           *sweep, f"seed={seed}", *budget, *METHOD_OVERRIDES.get(method, []),
           f"hydra.sweep.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(folder / "search.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        return f"{method} seed {seed}: FAILED (rc {proc.returncode}), see {folder / 'search.log'}"
    (folder / "done").touch()
    return f"{method} seed {seed}: {' '.join(sweep)} done"


def jobs_of(args: argparse.Namespace, budget: list[str]) -> list[tuple]:
    """(method, seed, sweep, folder) for every multirun the command asks for."""
    if args.knob:
        plan = record_knobs(args.out, args.methods, budget)
        return [(m, s, [f"peft.lr={grid(k['lr'], [1.0])[0]}",
                        f"peft.{k['name']}={','.join(f'{v:g}' for v in KNOBS[m][1])}"],
                 args.out / m / f"seed{s}-{k['name']}")
                for s in args.seeds for m, k in ((m, plan["knobs"][m]) for m in args.methods)]
    plan = record_plan(args.out, args.methods, args.factors, budget)
    return [(m, s, ["peft.lr=" + ",".join(grid(plan["methods"][m]["shipped_lr"], args.factors))],
             folder_of(args.out, m, s, args.factors)) for s in args.seeds for m in args.methods]


def run(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.methods or []) - set(methods()))
    if unknown:
        raise SystemExit(f"error: no conf/peft/<name>.yaml for {unknown}; choose from {methods()}")
    if args.knob:
        args.methods = args.methods or sorted(KNOBS)
        knobless = sorted(set(args.methods) - set(KNOBS))
        if knobless:
            raise SystemExit(f"error: {knobless} have no knob to search (zoo_search.KNOBS); "
                             f"choose from {sorted(KNOBS)}")
        if args.factors is not None:
            raise SystemExit("error: --factors sets the lr grid and --knob searches a knob at the "
                             "shipped lr: give one of them")
    args.methods = args.methods or methods()
    args.factors = args.factors or FACTORS
    budget = args.overrides or BUDGET
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = pool.map(lambda job: launch(*job[:2], job[2], job[3], budget, threads),
                           jobs_of(args, budget))
        failed = 0
        for line in results:
            print(line, flush=True)
            failed += "FAILED" in line
    return 1 if failed else 0


def summarise(args: argparse.Namespace) -> int:
    from reports.tables import collect_runs
    from reports.tables.search import (knob_verdicts, search_csv, search_markdown,
                                       search_plot, verdicts)

    plan = json.loads((args.dir / PLAN).read_text())
    runs, warnings = collect_runs([args.dir])
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    found = verdicts(runs, {m: r["shipped_lr"] for m, r in plan["methods"].items()})
    out = args.out or args.dir
    out.mkdir(parents=True, exist_ok=True)
    text = search_markdown(found)
    (out / "search.md").write_text(text)
    (out / "search.csv").write_text(search_csv(found))
    search_plot(found, out / "search.png")
    print(text)
    written = ["search.md", "search.csv", "search.png"]
    knobs = knob_verdicts(runs, plan.get("knobs", {}))
    if knobs:
        text = search_markdown(knobs)
        (out / "knobs.md").write_text(text)
        (out / "knobs.csv").write_text(search_csv(knobs))
        search_plot(knobs, out / "knobs.png")
        print(text)
        written += ["knobs.md", "knobs.csv", "knobs.png"]
    print(f"wrote {', '.join(written)} to {out}", file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="launch the grid (resumes: skips what is done)")
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--methods", nargs="+", default=None,
                    help="default: every method (with --knob: every one with a knob)")
    go.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    go.add_argument("--factors", nargs="+", type=float, default=None,
                    help="times the shipped lr (default 0.3 1 3); another set (10, past an "
                         "edge the best sat on) runs into seed<s>-x10")
    go.add_argument("--knob", action="store_true",
                    help="search each method's key knob (KNOBS) at its lr, not the lr grid")
    go.add_argument("--parallel", type=int, default=1)
    report = sub.add_parser("summarise", help="the verdicts: search.md/csv/png")
    report.add_argument("dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="default: DIR")
    args = parser.parse_args(argv)
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args) if args.command == "run" else summarise(args)


if __name__ == "__main__":
    sys.exit(main())

"""What the command lines in `scripts/` report, as importable code: `reports.tables` builds the
report's Tables 1–3, Figure 2 and the generic tasks table from folders of Hydra runs
(`scripts/make_tables.py`); `reports.bench` holds the measurement helpers the benchmark scripts
share (`scripts/bench_*.py`). The top layer: it may import trainers, tasks, minbert and common,
and nothing imports it but the scripts and the tests."""

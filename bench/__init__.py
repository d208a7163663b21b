"""msd_fast's performance evidence: pytest-benchmark suites (``bench_*.py``), a profiler of kernel time vs host
overhead (``python -m bench.profile_ops``) and a report (``python -m bench.report RUN.json``).

    pytest bench/ --benchmark-only --benchmark-json run.json && python -m bench.report run.json --out reports/

Not installed with msd_fast: run it from the repository root.
"""

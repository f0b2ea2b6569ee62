"""Benchmarks of taskserve, each against a baseline measured in the same run.

Run them as modules from the repository root, e.g.
``python -m benchmarks.bench_requests --help``; benchmarks/README.md says what
each measures, and docs/performance.md records their figures.
"""

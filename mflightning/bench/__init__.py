"""Benchmarks: `python -m mflightning.bench core|...` (cost and quality figures as JSON + markdown)."""

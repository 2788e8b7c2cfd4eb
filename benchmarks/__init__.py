"""moetrain's benchmarks: measurement code behind ``tools/bench_*.py`` (docs/benchmarks.md).

It lives in the repository beside ``moetrain/`` and is not installed with it: run the tools
from a checkout (they put the repository root on ``sys.path``); pytest finds it through
``pythonpath`` in pyproject.toml.
"""

"""The run report: ``report.html`` (loss, validation loss, throughput, expert load per MoE layer,
drops) and ``expert_load.png``, built from a run directory's ``metrics.jsonl`` (the whole run,
across resumes). The trainer writes them at the end of every run (``RunReport`` callback);
``python -m moetrain.report <run dir>`` rebuilds them. See docs/run-report.md."""

from moetrain.report.build import Report, build_report

__all__ = ["Report", "build_report"]

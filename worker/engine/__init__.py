"""The pruning engine: pure PyTorch + transformers.

It knows nothing of Celery, HTTP or the database. Entry points:

- ``worker.engine.pipeline.run_job(spec, RunOptions(...), on_progress=..., should_cancel=...)``
  with ``spec`` a ``worker.engine.contract.spec.JobSpec`` (the one job spec): loads a model,
  calibrates, prunes block by block, evaluates and saves; returns the report (``run`` returns it typed).
- ``worker.engine.sparsegpt.sparsegpt_prune`` solves one layer.
- ``worker.engine.cli.main`` is ``sparsegpt prune``.
"""

"""Serving: answering requests from a finished run directory (the last stage of the pipeline).

* :mod:`~sigmarec.serving.runtime` - load a run once and turn requests (a user or an explicit
  history, a task or a free-text instruction, filters, k) into ranked items, for SIGMA or any
  baseline of the run.
* :mod:`~sigmarec.serving.api` - the FastAPI service (micro-batching, Prometheus metrics).
* :mod:`~sigmarec.serving.store` / :mod:`~sigmarec.serving.nearline` - the user-to-item (U2I)
  store and the nearline job that refreshes it with prompt KV-cache reuse.
* :mod:`~sigmarec.serving.items` - new items without retraining (cold start).

Serving may import every earlier stage; no earlier stage imports serving.
"""

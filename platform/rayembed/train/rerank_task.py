"""Where :func:`rayembed.train.tasks.make_task` imports ``train.mode=rerank``'s task from; the task
itself is :class:`rayembed.rerank.task.RerankTask`. Goes once make_task imports it from there."""

from __future__ import annotations

from rayembed.rerank.task import RerankTask

__all__ = ["RerankTask"]

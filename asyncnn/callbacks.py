"""Callbacks of ``Trainer.fit``: hooks at the end of each step and epoch, early stopping, and
metrics loggers. See ``docs/workflow.md``."""

from ._callbacks import Callback, EarlyStopping, JSONLLogger, TensorBoardLogger

__all__ = ["Callback", "EarlyStopping", "JSONLLogger", "TensorBoardLogger"]

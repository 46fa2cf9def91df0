"""Pretraining in parts: ``trainer`` (the loop), ``checkpointing`` (resumable step folders),
``losses`` (cross-entropy and the DAG terms), ``schedule`` (warm-up + cosine), ``optim`` (AdamW).

``pretrain(TrainArgs(...))`` is the entry point ``pldr pretrain`` calls."""

from pldr_core.training.args import TrainArgs, TrainResult
from pldr_core.training.trainer import DAG_LOG_EVERY, Trainer, TrainingDiverged, pretrain

__all__ = ["DAG_LOG_EVERY", "TrainArgs", "TrainResult", "Trainer", "TrainingDiverged", "pretrain"]

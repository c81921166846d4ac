"""Supervised fine-tuning: config, step, loop, optimizer, checkpoints. `python -m jaxft.train CONFIG.yaml`.

    from jaxft.train import load_config, run
    summary = run(load_config("configs/quickstart.yaml", ["train.steps=10"]))
"""

from jaxft.train.checkpoint import Checkpointer
from jaxft.train.config import TrainConfig, load_config, parse_config
from jaxft.train.loop import run
from jaxft.train.optim import OptimConfig, lr_schedule, make_optimizer
from jaxft.train.signals import StopSignal
from jaxft.train.step import Model, loss_sum, make_eval_step, make_train_step

__all__ = ["Checkpointer", "Model", "OptimConfig", "StopSignal", "TrainConfig", "load_config", "loss_sum",
           "lr_schedule", "make_eval_step", "make_optimizer", "make_train_step", "parse_config", "run"]

"""Supervised fine-tuning: config, stages, step, optimizer, checkpoints. `python -m jaxft.train CONFIG.yaml`.

    from jaxft.train import load_config, run
    summary = run(load_config("configs/quickstart.yaml", ["train.steps=10"]))

or stage by stage (see `jaxft.train.loop`):

    prep = prepare(cfg); session = build(prep); restore(prep, session)
    result = train(prep, session); print(evaluate(prep, session))
"""

from jaxft.train.checkpoint import Checkpointer
from jaxft.train.config import TrainConfig, load_config, parse_config
from jaxft.train.scoring import eval_loss, exact_match
from jaxft.train.loop import Session, TrainResult, build, claim, evaluate, export, restore, run, train
from jaxft.train.optim import OptimConfig, lr_schedule, make_optimizer
from jaxft.train.preflight import Prepared, check, prepare
from jaxft.train.signals import StopSignal
from jaxft.train.step import StaticModel, count_params, loss_sum, make_eval_step, make_train_step

__all__ = ["Checkpointer", "OptimConfig", "Prepared", "Session", "StaticModel", "StopSignal", "TrainConfig",
           "TrainResult", "build", "check", "claim", "count_params", "eval_loss", "evaluate", "exact_match", "export",
           "load_config", "loss_sum", "lr_schedule", "make_eval_step", "make_optimizer", "make_train_step",
           "parse_config", "prepare", "restore", "run", "train"]

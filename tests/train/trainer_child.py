"""Child process for tests/train/test_trainer_run.py: `python -m jaxft.train`'s main, preempted by a SIGTERM.

    python tests/train/trainer_child.py CONFIG.yaml [overrides ...]

The process sends itself SIGTERM right after the trainer's first checkpoint save, the way a scheduler's preemption
notice lands mid-run at a known step; the trainer must finish that step, save, and exit 0. The exit code is main's.
"""

import os
import signal
import sys


def main() -> int:
    from jaxft.train import checkpoint
    from jaxft.train.__main__ import main as train_main

    original = checkpoint.Checkpointer.save
    sent = []

    def save_then_preempt(self, step, state, **kw):
        out = original(self, step, state, **kw)
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    checkpoint.Checkpointer.save = save_then_preempt
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

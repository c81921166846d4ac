"""Child process for tests/train/test_trainer_run.py: `python -m jaxft.train`'s main, interrupted.

    python tests/train/trainer_child.py CONFIG.yaml [overrides ...]                 # SIGTERM after the first save
    JAXFT_TEST_KILL_AT=5 python tests/train/trainer_child.py CONFIG.yaml [...]      # SIGKILL once step 5 is logged

SIGTERM: the process sends itself SIGTERM right after the trainer's first checkpoint save, the way a scheduler's
preemption notice lands mid-run at a known step; the trainer must finish that step, save, and exit 0. The exit code
is main's.

SIGKILL (kill -9 between checkpoints): every checkpoint save is waited for (so the last one is on disk), and the
process kills itself right after logging train step JAXFT_TEST_KILL_AT: the steps after the last checkpoint are
logged but lost, and the resumed run takes them again.
"""

import os
import signal
import sys


def main() -> int:
    from jaxft.train import checkpoint, report
    from jaxft.train.__main__ import main as train_main

    original = checkpoint.Checkpointer.save
    kill_at = os.environ.get("JAXFT_TEST_KILL_AT")
    sent = []

    def save_then_preempt(self, step, state, **kw):
        out = original(self, step, state, **kw)
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    def save_and_wait(self, step, state, **kw):
        out = original(self, step, state, **kw)
        self.wait()
        return out

    if kill_at is None:
        checkpoint.Checkpointer.save = save_then_preempt
    else:
        checkpoint.Checkpointer.save = save_and_wait
        write = report.MetricsWriter.write

        def write_then_kill(self, step, kind, values):
            write(self, step, kind, values)
            if kind == "train" and step == int(kill_at):
                self.close()  # the events so far reach the disk, as they would have after flush_secs
                os.kill(os.getpid(), signal.SIGKILL)

        report.MetricsWriter.write = write_then_kill
    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

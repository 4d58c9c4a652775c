"""The trainer's command line with test hooks: ``python tests/parallel/mp_train.py <trainer flags>``.

Runs ``bitdance_jax.train.cli.main`` (so ``--config/--workdir/--coordinator/...`` are the
real flags) and, when set in the environment:

* ``MP_KILL=I:S``: process I SIGKILLs itself right after step S is dispatched (a crash),
  once some checkpoint is complete (so that the relaunch has one to resume from);
* ``MP_TERM_LAUNCHER=I:S``: process I sends SIGTERM to its parent (tools/launch_local.py,
  which forwards it to every process) right after step S, then pauses 3 s.

Every process writes the loss of each step it logged to ``<stage workdir>/losses.<I>.json``
and appends what ``train`` returned to ``<workdir>/launches.<I>.jsonl``.
"""
import json
import os
import signal
import sys
import time


def _parse(name):
    value = os.environ.get(name)
    if not value:
        return None
    process, step = value.split(":")
    return int(process), int(step)


def main():
    import jax
    from bitdance_jax.train import cli, metrics, trainer

    kill, term = _parse("MP_KILL"), _parse("MP_TERM_LAUNCHER")

    def on_step(step, batch):
        me = jax.process_index()
        if kill == (me, step):
            ckpts = os.path.join(os.path.abspath(workdir_of[0]), "checkpoints")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    d.isdigit() for d in os.listdir(ckpts)):
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        if term == (me, step):
            os.kill(os.getppid(), signal.SIGTERM)
            # Give the notice time to reach the coordination service (a real preemption
            # leaves seconds too), so that the agreed step comes before the last one.
            time.sleep(3)

    real_train = trainer.train
    workdir_of = [None]

    def train(config, workdir, **kw):
        workdir_of[0] = workdir
        summary = real_train(config, workdir, on_step=on_step, **kw)
        path = os.path.join(workdir, f"launches.{jax.process_index()}.jsonl")
        with open(path, "a") as f:  # what train() returned on this process, one line a launch
            f.write(json.dumps(summary, default=str) + "\n")
        return summary

    cli.train = train

    logger_cls = metrics.MetricLogger

    class RecordingLogger(logger_cls):
        def __init__(self, workdir, *args, **kwargs):
            super().__init__(workdir, *args, **kwargs)
            self.losses, self.path = [], os.path.join(workdir,
                                                      f"losses.{jax.process_index()}.json")

        def add(self, metrics_):
            self.losses.append(float(metrics_["loss"]))
            super().add(metrics_)

        def close(self):
            with open(self.path, "w") as f:
                json.dump(self.losses, f)
            super().close()

    trainer.MetricLogger = RecordingLogger
    return cli.main(sys.argv)


if __name__ == "__main__":
    sys.exit(main())

"""The trainer: builds the mesh, state and jitted step for a task, and runs the loop with checkpoints, metrics, preemption and the final export.

Relaunching with the same workdir resumes exactly from the last checkpoint (params, EMA,
optimizer state, step, RNG and the Grain iterator state). ``config.kind == "pipeline"`` runs
stages one after another in ``<workdir>/<stage>``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bitdance_jax.checkpointing.param_dir import load_param_dir
from bitdance_jax.data.pipeline import to_global_arrays
from bitdance_jax.parallel import distributed, sharding
from bitdance_jax.train import optimizer as optim
from bitdance_jax.train import resume
from bitdance_jax.train.checkpoints import (make_checkpoint_manager, restore_latest,
                                            save_checkpoint)
from bitdance_jax.train.metrics import MetricLogger, peak_flops_per_device, step_flops
from bitdance_jax.train.step import jit_train_step
from bitdance_jax.train.tasks import make_task

log = logging.getLogger("bitdance_jax.train")

# How long the other processes wait while process 0 draws a sample grid alone.
SAMPLE_TIMEOUT_S = 3 * 3600.0


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good state was saved."""


def global_batch_size(config, mesh) -> int:
    batch = config.global_batch_size or config.per_device_batch_size * mesh.devices.size
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % data_ways:
        raise ValueError(f"global batch {batch} is not divisible by the data axis: mesh "
                         f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {data_ways}")
    if batch % jax.process_count():
        raise ValueError(f"global batch {batch} not divisible by {jax.process_count()} processes")
    return batch


def check_intervals(config) -> None:
    """Step intervals the loop divides by: caught here, not as a ZeroDivisionError mid-run."""
    log_every, sample_every = config.log_every, config.sample_every
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"config.log_every must be a whole number of steps >= 1, got {log_every!r}")
    if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 0:
        raise ValueError(f"config.sample_every must be a whole number of steps >= 0 (0: only "
                         f"the final grid), got {sample_every!r}")


@dataclasses.dataclass
class Trainer:
    """Everything built from a config: mesh, task, optimizer, shardings, jitted step."""
    config: Any
    workdir: str | None
    mesh: Any = None
    # The task (default: ``make_task(config, workdir)``); the compile tool passes one built
    # on an abstract tokenizer.
    task: Any = None

    def __post_init__(self):
        c = self.config
        check_intervals(c)
        self.mesh = self.mesh or sharding.make_mesh(tuple(c.mesh))
        self.task = self.task or make_task(c, self.workdir)
        self.global_batch = global_batch_size(c, self.mesh)

    # -- optimizer and state ----------------------------------------------------------
    def build(self, num_steps: int):
        o = self.config.optim
        self.num_steps = num_steps
        self.schedule = optim.lr_schedule(o.lr, warmup_steps=o.warmup_steps,
                                          decay_start=o.decay_start, total_steps=num_steps,
                                          min_lr=o.min_lr)
        self.recipe = optim.AdamWRecipe(schedule=self.schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                        weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                                        no_decay_names=tuple(o.no_decay_names))
        self.optimizer = self.recipe.transformation()
        boxed = jax.eval_shape(self.task.init, jax.random.PRNGKey(0))
        self.param_shardings = sharding.divisible_logical_sharding(boxed, self.mesh)
        abstract_params = nn.unbox(boxed)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        rep = sharding.replicated(self.mesh)
        self.state_shardings = {
            "step": rep, "rng": rep, "ok": rep,
            "params": self.param_shardings, "ema": self.param_shardings,
            "opt_state": optim.opt_state_shardings(abstract_opt, self.param_shardings, rep)}
        self.abstract_state = {
            "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
            "ok": jax.ShapeDtypeStruct((), jnp.bool_),
            "params": abstract_params, "ema": abstract_params, "opt_state": abstract_opt}
        # Frozen inputs of the step (the tokenizer encoding images): replicated on the mesh.
        # Only their shapes here; ``frozen`` puts them on the devices when first read.
        self.abstract_frozen = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep), self.task.frozen())
        self.frozen_shardings = jax.tree.map(lambda x: x.sharding, self.abstract_frozen)
        self._step_fn = self._frozen = None
        return self

    @property
    def frozen(self):
        if self._frozen is None:
            self._frozen = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s),
                                        self.task.frozen(), self.frozen_shardings)
        return self._frozen

    def init_state(self, init_params=None):
        """Fresh state (``init_params``: a param tree from a ported/trained checkpoint, which
        must have exactly the params of the configured model)."""
        seed = self.config.seed

        def fresh(rng, params):
            params = nn.unbox(self.task.init(rng)) if params is None else params
            return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed),
                    "ok": jnp.ones((), jnp.bool_), "params": params, "ema": params,
                    "opt_state": self.optimizer.init(params)}

        in_shardings = (sharding.replicated(self.mesh), None)
        if init_params is not None:
            self.check_params(init_params)
            init_params = jax.tree.map(lambda x, a: np.asarray(x, a.dtype), init_params,
                                       self.abstract_state["params"])
            init_params = jax.device_put(init_params, self.param_shardings)
            in_shardings = (in_shardings[0], self.param_shardings)
        return jax.jit(fresh, in_shardings=in_shardings, out_shardings=self.state_shardings)(
            jax.random.fold_in(jax.random.PRNGKey(seed), 1 << 20), init_params)

    def check_params(self, params):
        """ValueError naming the first missing / extra / mis-shaped param."""
        def shapes(tree):
            return {tuple(optim.path_names(p)): np.shape(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

        want, got = shapes(self.abstract_state["params"]), shapes(params)
        for key in sorted(set(want) | set(got)):
            if key not in got:
                raise ValueError(f"init params lack {'/'.join(key)} {want[key]}")
            if key not in want:
                raise ValueError(f"init params have {'/'.join(key)}, which the model does not")
            if tuple(got[key]) != tuple(want[key]):
                raise ValueError(f"init param {'/'.join(key)} has shape {tuple(got[key])}, "
                                 f"the model {tuple(want[key])}")

    def batch_sharding(self, ndim: int):
        return sharding.batch_sharding(self.mesh, ndim)

    def abstract_inputs(self, batch: dict):
        """(state, frozen, batch) of the step as ShapeDtypeStructs on their shardings: what
        the step is lowered for, from real arrays or from shapes alone (nothing allocated)."""
        def on(x, s):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

        state = jax.tree.map(on, self.abstract_state, self.state_shardings)
        batch = {k: on(v, self.batch_sharding(np.ndim(v))) for k, v in batch.items()}
        return state, self.abstract_frozen, batch

    def context(self):
        """The mesh and logical-axis rules the step is traced under (activation constraints
        resolve through them)."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
        return stack

    # -- the step ---------------------------------------------------------------------
    def step_fn(self, batch_example: dict):
        """The jitted step (``step.train_step`` with this run's shardings)."""
        if self._step_fn is None:
            self._step_fn = jit_train_step(
                loss_fn=self.task.loss, recipe=self.recipe,
                ema_decay=self.config.optim.ema_decay, state_shardings=self.state_shardings,
                frozen_shardings=self.frozen_shardings,
                batch_shardings={k: self.batch_sharding(np.ndim(v))
                                 for k, v in batch_example.items()},
                metrics_sharding=sharding.replicated(self.mesh))
        return self._step_fn

    def lower_step(self, batch: dict):
        """The step lowered for ``batch`` (arrays or ShapeDtypeStructs of the global batch);
        the trainer compiles this, and so does ``bitdance_jax.compile`` for a TPU topology."""
        with self.context():
            return self.step_fn(batch).lower(*self.abstract_inputs(batch))

    def compile_step(self, batch: dict):
        """Ahead-of-time compiled step (one compile; its cost analysis gives the FLOPs)."""
        return self.lower_step(batch).compile()

    def to_device(self, local_batch):
        return to_global_arrays(local_batch, self.batch_sharding)



class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits.

    Multi-process: no Python handler. jax.distributed's preemption service has its own
    SIGTERM handler (a Python one would replace it); it makes every process agree on the step
    at which all of them save and stop (``mngr.reached_preemption``), even when only one of
    them was signalled."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if jax.process_count() > 1 and _preemption_service_running():
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _preemption_service_running() -> bool:
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.preemption_sync_manager is not None


def num_train_steps(config, num_records: int, global_batch: int) -> int:
    if config.num_steps > 0:
        return int(config.num_steps)
    if config.epochs <= 0:
        raise ValueError("set config.num_steps or config.epochs")
    return int(config.epochs * (num_records // global_batch))


def train(config, workdir: str, *, mesh=None, stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          allow_config_change: bool = False) -> dict:
    """Train ``config`` in ``workdir`` (resuming when it holds checkpoints).

    Resuming with a config that differs from the saved one in what decides the batches or the
    math is refused unless ``allow_config_change`` (``bitdance_jax.train.resume``).

    ``stop_after``: return once the state reaches that step (tests / benchmarks), leaving a
    checkpoint there. ``on_step(step, local_batch)`` is called after each step is dispatched.
    Returns a summary (final step, last metrics, paths).
    """
    if config.kind == "pipeline":
        return run_pipeline(config, workdir, mesh=mesh)
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, workdir, mesh)
    source = trainer.task.train_source()
    num_steps = num_train_steps(config, len(source), trainer.global_batch)
    trainer.build(num_steps)
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    changes = resume.check_resume_config(workdir, config_json,
                                         allow_config_change=allow_config_change)
    if distributed.is_main():
        resume.write_config(workdir, config_json, changes)

    dataset = trainer.task.train_dataset(source, config.data, global_batch=trainer.global_batch,
                                         num_steps=num_steps, seed=config.seed)
    data_iter = iter(dataset)
    mngr = make_checkpoint_manager(workdir, config)
    restored = restore_latest(mngr, trainer.abstract_state, trainer.state_shardings)
    if restored is not None:
        latest, state, data_state = restored
        try:
            data_iter.set_state(data_state)
        except (KeyError, TypeError, ValueError) as e:  # Grain: another worker count or pipeline
            raise ValueError(f"the data iterator state saved at step {latest} in {mngr.directory} "
                             f"does not fit this data pipeline ({type(e).__name__}: {e}); was "
                             f"data.worker_count or data.source changed?") from None
        log.info("resumed from %s at step %d", mngr.directory, latest)
    else:
        init_params = None
        if config.init_from:
            meta, loaded = load_param_dir(config.init_from)  # any kind: the task picks its part
            init_params = trainer.task.params_from_checkpoint(meta, loaded)
            log.info("initialised params from %s", config.init_from)
        else:
            init_params = trainer.task.pretrained_params()
        state = trainer.init_state(init_params)
    start = int(jax.device_get(state["step"]))
    summary = {"workdir": workdir, "num_steps": num_steps, "start_step": start}
    if start >= num_steps:
        mngr.close()
        return _finish(trainer, state, source, workdir, summary)

    logger = None
    # The loss of a step is read one step late (keeps the device busy); it is read at once
    # before any save, so a checkpoint never holds a state past a non-finite step.
    data_states = {start: data_iter.get_state()}
    pending = None
    step = start
    try:
        with _Preemption() as preempt, trainer.context():
            while step < num_steps:
                local_batch = next(data_iter)
                batch = trainer.to_device(local_batch)
                if logger is None:
                    fn = trainer.compile_step(batch)
                    logger = MetricLogger(workdir, num_steps, start, trainer.global_batch,
                                          trainer.task.tokens_per_example, step_flops(fn),
                                          peak_flops_per_device(config))
                state, metrics = fn(state, trainer.frozen, batch)
                step += 1
                data_states[step] = data_iter.get_state()
                data_states.pop(step - 3, None)
                if on_step is not None:
                    on_step(step, local_batch)
                if pending is not None:
                    state = _check_finite(pending, mngr, state, data_states)
                    logger.add(pending[1])
                pending = (step, metrics)
                # Multi-host: Orbax's preemption sync makes every process stop at the same step.
                preempted = mngr.reached_preemption(step) or (
                    jax.process_count() == 1 and preempt.requested)
                stopping = (preempted or step == num_steps
                            or (stop_after is not None and step >= stop_after))
                sampling = bool(config.sample_every) and step % config.sample_every == 0
                if stopping or sampling or step % config.log_every == 0 or mngr.should_save(step):
                    state = _check_finite(pending, mngr, state, data_states)
                    logger.add(pending[1])
                    pending = None
                if step % config.log_every == 0 or step == num_steps:
                    summary["metrics"] = logger.flush(step)
                save_checkpoint(mngr, step, state, data_states[step], force=stopping)
                if sampling and step < num_steps:
                    ema = host_params(state["ema"])  # a collective: every process takes part
                    if distributed.is_main():  # on its local devices: no collective
                        trainer.task.sample_grid(ema, source, os.path.join(
                            workdir, "samples", f"step_{step:07d}.png"), config.seed)
                    distributed.barrier("sample_grid", timeout_s=SAMPLE_TIMEOUT_S)
                if stopping and step < num_steps:
                    mngr.wait_until_finished()
                    if preempted:
                        log.warning("preempted: saved step %d in %s; relaunch to resume", step,
                                    mngr.directory)
                    summary.update(step=step, preempted=preempted, stopped=True)
                    return summary
            mngr.wait_until_finished()
    finally:
        if logger is not None:
            logger.close()
        mngr.close()
    return _finish(trainer, state, source, workdir, summary)


def _check_finite(pending, mngr, state, data_states):
    """Stop on a NaN/inf loss of step ``pending[0]``. The jitted step masks the update of a
    non-finite step and of every later one, so ``state`` is still the last good state: it is
    saved (with the matching Grain iterator state) before raising."""
    step, metrics = pending
    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(gnorm):
        return state
    good = int(jax.device_get(state["step"]))
    mngr.wait_until_finished()
    if mngr.latest_step() != good:
        state = dict(state, ok=jax.device_put(jnp.ones((), jnp.bool_), state["ok"].sharding))
        save_checkpoint(mngr, good, state, data_states[good], force=True)
        mngr.wait_until_finished()
    raise NonFiniteLossError(f"non-finite loss at step {step} (loss={loss}, grad_norm={gnorm}); "
                             f"the last good state (step {good}) is saved in {mngr.directory}")


def host_params(tree):
    """Numpy copy of a (possibly multi-host sharded) param tree on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def _finish(trainer: Trainer, state, source, workdir: str, summary: dict) -> dict:
    """Export of the EMA params by every process (gathering them and the Orbax save are
    collectives), then the final sample grid (on process 0's local devices) and summary.json
    by process 0 while the others wait for it."""
    summary["step"] = int(jax.device_get(state["step"]))
    ema = host_params(state["ema"])
    summary["export"] = os.path.join(workdir, "export")
    trainer.task.export(ema, summary["export"])
    if distributed.is_main():
        summary["samples"] = trainer.task.sample_grid(
            ema, source, os.path.join(workdir, "samples", "final.png"), trainer.config.seed)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    distributed.barrier("final_samples", timeout_s=SAMPLE_TIMEOUT_S)
    return summary


def run_pipeline(config, workdir: str, *, mesh=None) -> dict:
    """Stages in order, each in ``workdir/<name>`` (each resumes on relaunch). A BitDance
    stage with ``tokenizer_from_stage`` uses the tokenizer that stage exported. With
    ``score_digits``, the final class-conditional samples are scored by a classifier fitted
    on the real digits (``workdir/score.json``)."""
    results = {}
    for name in config.stages:
        if name not in config:
            raise ValueError(f"pipeline stage {name!r} has no config (config.{name})")
        stage = config[name]
        stage_dir = os.path.join(workdir, name)
        if stage.kind == "bitdance" and stage.get("tokenizer_from_stage"):
            with stage.unlocked():
                stage.tokenizer_dir = os.path.join(workdir, stage.tokenizer_from_stage, "export")
        log.info("pipeline stage %s (%s) in %s", name, stage.kind, stage_dir)
        results[name] = train(stage, stage_dir, mesh=mesh)
    if config.score_digits and distributed.is_main():  # numpy and scikit-learn only
        from bitdance_jax.evaluation.digits_score import score_samples
        samples = os.path.splitext(results[config.stages[-1]]["samples"])[0] + ".npz"
        with np.load(samples) as f:
            results["score"] = score_samples(f["images"], f["labels"])
        with open(os.path.join(workdir, "score.json"), "w") as f:
            json.dump(results["score"], f, indent=2)
        log.info("digits score (share of samples classified as their class): %.3f",
                 results["score"]["score"])
    if config.score_digits:
        distributed.barrier("pipeline_score", timeout_s=SAMPLE_TIMEOUT_S)
    return results



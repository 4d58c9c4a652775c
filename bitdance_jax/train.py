"""One trainer for the binary tokenizer and the autoregressive BitDance model.

    python -m bitdance_jax.train --config configs/<name>.py --workdir DIR [--config.<field>=<value>]

``config.kind`` says what is trained: ``tokenizer``, ``bitdance``, or ``pipeline`` (stages run
one after another in ``DIR/<stage>``; the embedded default trains the tokenizer, then BitDance).
Relaunching with the same workdir resumes exactly from the last checkpoint (params, EMA,
optimizer state, step, RNG and the Grain iterator state).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn

from bitdance_jax import data as data_lib
from bitdance_jax import images as image_lib
from bitdance_jax import optim, sharding, tokenizer_losses
from bitdance_jax.checkpoint import load_param_dir
from bitdance_jax.layers import DTYPES
from bitdance_jax.tokenizer import BinaryAutoencoder, TokenizerConfig, quantizer_losses

log = logging.getLogger("bitdance_jax.train")

KINDS = ("tokenizer", "bitdance", "t2i", "pipeline")

# Dense peak FLOP/s per chip (bf16) by jax device_kind prefix, for the MFU estimate.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12),
)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good state was saved."""


# ---------------------------------------------------------------------------------------
# Config parsing.

def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a Python config file (as ml_collections' config_flags loads it)."""
    import importlib.util
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("bitdance_train_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config()")
    return module.get_config()


def _parse_value(text: str, current):
    """A command-line value in the type of the field it replaces."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    value = ast.literal_eval(text)
    if isinstance(current, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value


def apply_override(config, dotted: str, text: str):
    """Set ``config.<dotted>`` from a string; an unknown field raises a ValueError naming it
    and the fields that do exist at that level."""
    *parents, leaf = dotted.split(".")
    node, walked = config, "config"
    for part in parents + [leaf]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(f"unknown config field '{walked}.{part}' "
                             f"(fields of {walked}: {', '.join(known) or 'none'})")
        if part != leaf:
            node, walked = node[part], f"{walked}.{part}"
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ValueError(f"config.{dotted} is a group of fields; set one of its fields")
    try:
        node[leaf] = _parse_value(text, node[leaf])
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"bad value {text!r} for config.{dotted}: {e}") from e


def parse_args(argv: list[str]):
    """``--config FILE --workdir DIR [--config.a.b=v ...]`` -> (config, workdir, multihost)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bitdance_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py)")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and samples")
    parser.add_argument("--multihost", choices=["auto", "yes", "no"], default="auto",
                        help="call jax.distributed.initialize() (auto: on multi-host launches)")
    overrides, rest = [], []
    for a in argv[1:]:
        (overrides if a.startswith("--config.") else rest).append(a)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:
        if e.code == 0:  # --help
            raise
        raise ValueError(f"bad command line: {' '.join(argv[1:])}") from e
    config = load_config_file(args.config)
    for a in overrides:
        if "=" not in a:
            raise ValueError(f"{a}: write --config.<field>=<value>")
        dotted, text = a[len("--config."):].split("=", 1)
        apply_override(config, dotted, text)
    return config, args.workdir, args.multihost


def maybe_initialize_distributed(mode: str = "auto"):
    """``jax.distributed.initialize()`` on multi-host launches (SLURM, TPU pods, explicit env)."""
    env = os.environ
    several = (int(env.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in env
               or "," in env.get("TPU_WORKER_HOSTNAMES", "")
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if mode == "yes" or (mode == "auto" and several):
        jax.distributed.initialize()


# ---------------------------------------------------------------------------------------
# Sizes derived from the devices present.

def make_train_mesh(config):
    return sharding.make_mesh(tuple(config.mesh))


def global_batch_size(config, mesh) -> int:
    batch = config.global_batch_size or config.per_device_batch_size * mesh.devices.size
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % data_ways:
        raise ValueError(f"global batch {batch} is not divisible by the data axis: mesh "
                         f"data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {data_ways}")
    if batch % jax.process_count():
        raise ValueError(f"global batch {batch} not divisible by {jax.process_count()} processes")
    return batch


def peak_flops_per_device(config) -> float | None:
    if config.get("peak_tflops_per_device", 0):
        return config.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None


# ---------------------------------------------------------------------------------------
# Tasks: what is trained (params init, loss, samples, export).

class TokenizerTask:
    """Binary tokenizer: reconstruction (L1/L2) + the quantizer's entropy and commitment losses,
    with an optional perceptual term (frozen feature network) and adversarial term (a PatchGAN
    trained in the same step: params are then {"tokenizer": ..., "discriminator": ...})."""
    kind = "tokenizer"

    def __init__(self, config):
        self.config = config
        self.tok_config = TokenizerConfig(**config.tokenizer.to_dict())
        dtype = DTYPES[config.compute_dtype]
        self.model = BinaryAutoencoder(self.tok_config, dtype=dtype)
        self.image_size = config.data.image_size
        f = self.tok_config.downsample_factor
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} not a multiple of the tokenizer's "
                             f"downsampling factor {f}")
        self.tokens_per_example = (self.image_size // f) ** 2
        lc = config.tokenizer_loss
        self.discriminator = None
        self.loss_takes_step = lc.adversarial_weight > 0  # the adversarial terms start at a step
        if lc.adversarial_weight > 0:
            if lc.adversarial_loss not in tokenizer_losses.ADVERSARIAL_LOSSES:
                raise ValueError(f"unknown tokenizer_loss.adversarial_loss "
                                 f"{lc.adversarial_loss!r}; use one of "
                                 f"{tokenizer_losses.ADVERSARIAL_LOSSES}")
            self.discriminator = tokenizer_losses.PatchDiscriminator(
                ch=lc.discriminator_ch, num_layers=lc.discriminator_layers, dtype=dtype)
        self.perceptual_apply = self.perceptual_params = None
        if lc.perceptual_weight > 0:
            self.perceptual_apply, self.perceptual_params = \
                tokenizer_losses.load_feature_network(lc.perceptual_network)

    def _noise(self, rng, batch, size):
        if not self.tok_config.gan_decoder:
            return None
        f = self.tok_config.downsample_factor
        return jax.random.normal(rng, (batch, size // f, size // f, self.tok_config.z_channels))

    def _tokenizer_params(self, params):
        return params["tokenizer"] if self.discriminator is not None else params

    def _init_discriminator(self, rng):
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return self.discriminator.init(jax.random.fold_in(rng, 1), images)["params"]

    def init(self, rng):
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        tok = self.model.init(rng, images, self._noise(rng, 1, self.image_size))["params"]
        if self.discriminator is None:
            return tok
        return {"tokenizer": tok, "discriminator": self._init_discriminator(rng)}

    def frozen(self):
        return {} if self.perceptual_params is None else {"perceptual": self.perceptual_params}

    def loss(self, params, frozen, batch, rng, step=None):
        """Total loss and its terms; ``step`` (traced) gates the adversarial terms (None: on)."""
        lc = self.config.tokenizer_loss
        images = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        recon, h = self.model.apply({"params": self._tokenizer_params(params)}, images,
                                    self._noise(rng, images.shape[0], images.shape[1]))
        recon = recon.astype(jnp.float32)
        err = recon - images
        l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(err ** 2)
        q = quantizer_losses(h, self.tok_config.num_codebooks)
        loss = (lc.l1_weight * l1 + lc.l2_weight * l2 + lc.entropy_weight * q.entropy_aux_loss
                + lc.commitment_weight * q.commitment)
        aux = {"l1": l1, "l2": l2, "entropy_aux": q.entropy_aux_loss,
               "commitment": q.commitment, "codebook_entropy": q.codebook_entropy}
        if self.perceptual_apply is not None:
            feats = self.perceptual_apply(frozen["perceptual"], jnp.concatenate([images, recon]))
            real, fake = zip(*(jnp.split(f, 2, axis=0) for f in feats))
            aux["perceptual"] = tokenizer_losses.perceptual_distance(real, fake)
            loss = loss + lc.perceptual_weight * aux["perceptual"]
        if self.discriminator is not None:
            gen, disc = tokenizer_losses.adversarial_losses(
                self.discriminator, params["discriminator"], images, recon,
                kind=lc.adversarial_loss,
                active=True if step is None else step >= lc.adversarial_start_step)
            aux.update(generator_adversarial=gen, discriminator=disc)
            loss = loss + lc.adversarial_weight * gen + lc.discriminator_weight * disc
        return loss, aux

    def params_from_checkpoint(self, meta, params):
        """The tokenizer part of any checkpoint; a fresh discriminator where one is trained."""
        tok = params.get("tokenizer", params) if meta.get("kind") != "tokenizer" else params
        if self.discriminator is None:
            return tok
        disc = nn.unbox(self._init_discriminator(jax.random.PRNGKey(self.config.seed)))
        return {"tokenizer": tok, "discriminator": disc}

    def sample_grid(self, ema_params, source, path, seed):
        """Top row: real images; bottom row: their reconstructions by the EMA params."""
        n = min(8, len(source))
        real = np.stack([data_lib.center_crop(source[i]["image"], self.image_size) for i in range(n)])
        x = jnp.asarray(real, jnp.float32) / 127.5 - 1.0
        noise = self._noise(jax.random.PRNGKey(seed), n, self.image_size)
        recon, _ = jax.jit(self.model.apply)({"params": self._tokenizer_params(ema_params)}, x,
                                             noise)
        grid = image_lib.make_grid(np.concatenate([real, image_lib.to_uint8(np.asarray(recon))]), n)
        return image_lib.save_png(grid, path)

    def export(self, ema_params, dst):
        """Saves only the tokenizer (not the discriminator) as a tokenizer directory."""
        from bitdance_jax.tokenizer_api import save_tokenizer
        params = jax.device_get(self._tokenizer_params(ema_params))
        return save_tokenizer(dst, self.tok_config, params, overwrite=True,
                              source="bitdance_jax.train")


def make_task(config, workdir: str | None = None):
    if config.kind == "tokenizer":
        return TokenizerTask(config)
    if config.kind == "bitdance":
        from bitdance_jax.train_bitdance import BitDanceTask
        return BitDanceTask(config, workdir)
    if config.kind == "t2i":
        from bitdance_jax.train_t2i import T2ITask
        return T2ITask(config, workdir)
    raise ValueError(f"unknown config.kind {config.kind!r}; use one of {KINDS}")


# ---------------------------------------------------------------------------------------
# State, shardings, the train step.

def _names(path) -> tuple[str, ...]:
    return tuple(optim._path_names(path))  # noqa: SLF001


def opt_state_shardings(abstract_opt_state, param_shardings, mesh):
    """Each optimizer leaf shaped like a param (mu, nu ...) takes that param's sharding."""
    by_path = {_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def pick(path, leaf):
        names = _names(path)
        for k in range(len(names)):
            s = by_path.get(names[k:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


@dataclasses.dataclass
class Trainer:
    """Everything built from a config: mesh, task, optimizer, shardings, jitted step."""
    config: Any
    workdir: str
    mesh: Any = None

    def __post_init__(self):
        c = self.config
        self.mesh = self.mesh or make_train_mesh(c)
        self.task = make_task(c, self.workdir)
        self.global_batch = global_batch_size(c, self.mesh)

    # -- optimizer and state ----------------------------------------------------------
    def build(self, num_steps: int):
        o = self.config.optim
        self.num_steps = num_steps
        self.schedule = optim.lr_schedule(o.lr, warmup_steps=o.warmup_steps,
                                          decay_start=o.decay_start, total_steps=num_steps,
                                          min_lr=o.min_lr)
        self.optimizer = optim.make_optimizer(schedule=self.schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                              weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                                              no_decay_names=tuple(o.no_decay_names))
        boxed = jax.eval_shape(self.task.init, jax.random.PRNGKey(0))
        self.param_shardings = sharding.divisible_logical_sharding(boxed, self.mesh)
        abstract_params = nn.unbox(boxed)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        rep = sharding.replicated(self.mesh)
        self.state_shardings = {
            "step": rep, "rng": rep, "ok": rep,
            "params": self.param_shardings, "ema": self.param_shardings,
            "opt_state": opt_state_shardings(abstract_opt, self.param_shardings, self.mesh)}
        self.abstract_state = {
            "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
            "ok": jax.ShapeDtypeStruct((), jnp.bool_),
            "params": abstract_params, "ema": abstract_params, "opt_state": abstract_opt}
        # Frozen inputs of the step (the tokenizer encoding images): replicated on the mesh.
        self.frozen = jax.tree.map(lambda x: jax.device_put(np.asarray(x), rep), self.task.frozen())
        self.frozen_shardings = jax.tree.map(lambda _: rep, self.frozen)
        self._step_fn = None
        return self

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
        want = {_names(p): a.shape for p, a in
                jax.tree_util.tree_flatten_with_path(self.abstract_state["params"])[0]}
        got = {_names(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
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

    # -- the step ---------------------------------------------------------------------
    def _train_step(self, state, frozen, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss_fn = (functools.partial(self.task.loss, step=state["step"])
                   if getattr(self.task, "loss_takes_step", False) else self.task.loss)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema"], params, self.config.optim.ema_decay)
        ok = state["ok"] & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {"step": state["step"] + ok.astype(jnp.int32), "rng": state["rng"], "ok": ok,
                     "params": keep(params, state["params"]), "ema": keep(ema, state["ema"]),
                     "opt_state": keep(opt_state, state["opt_state"])}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(state["step"]),
                   **aux}
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    def step_fn(self, batch_example: dict):
        """The jitted step: explicit in/out shardings, the state donated."""
        if self._step_fn is None:
            batch_shardings = {k: self.batch_sharding(np.ndim(v)) for k, v in batch_example.items()}
            self._step_fn = jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.frozen_shardings, batch_shardings),
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,))
        return self._step_fn

    def compile_step(self, state, batch):
        """Ahead-of-time compiled step (one compile; its cost analysis gives the FLOPs)."""
        return self.step_fn(batch).lower(state, self.frozen, batch).compile()

    def to_device(self, local_batch):
        return data_lib.to_global_arrays(local_batch, self.batch_sharding)


# ---------------------------------------------------------------------------------------
# Checkpoints.

def make_checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    cc = config.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cc.keep, save_interval_steps=max(1, cc.every_steps),
        enable_async_checkpointing=cc.async_save, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save_checkpoint(mngr, step: int, state, data_state, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)),
                     force=force)


def restore_checkpoint(mngr, trainer: Trainer, step: int):
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            trainer.abstract_state, trainer.state_shardings)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


# ---------------------------------------------------------------------------------------
# Metrics.

class MetricLogger:
    """Averages metrics over ``log_every`` steps; stdout (+ tqdm bar) and TensorBoard on process 0."""

    def __init__(self, workdir, total_steps, start_step, global_batch, tokens_per_example,
                 flops_per_device_step, peak_flops, enabled=True):
        self.enabled = enabled and jax.process_index() == 0
        self.global_batch, self.tokens_per_example = global_batch, tokens_per_example
        self.flops, self.peak = flops_per_device_step, peak_flops
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        self.writer = self.bar = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            from tqdm import tqdm
            self.writer = SummaryWriter(os.path.join(workdir, "tb"))
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)

    def add(self, metrics: dict):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)

    def flush(self, step: int) -> dict:
        if not self.count:
            return {}
        dt = time.perf_counter() - self.t0
        out = {k: v / self.count for k, v in self.sums.items()}
        steps_per_s = self.count / dt
        out.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * self.global_batch,
                   tokens_per_s=steps_per_s * self.global_batch * self.tokens_per_example)
        if self.flops and self.peak:
            out["mfu"] = self.flops * steps_per_s / self.peak
        if self.enabled:
            text = " ".join(f"{k}={v:.4g}" for k, v in sorted(out.items()))
            (self.bar.write if self.bar is not None else print)(f"step {step}: {text}")
            for k, v in out.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        return out

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def step_flops(compiled) -> float | None:
    """XLA's FLOP count of one compiled step per device (None where not reported)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ---------------------------------------------------------------------------------------
# The loop.

class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
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


def num_train_steps(config, num_records: int, global_batch: int) -> int:
    if config.num_steps > 0:
        return int(config.num_steps)
    if config.epochs <= 0:
        raise ValueError("set config.num_steps or config.epochs")
    return int(config.epochs * (num_records // global_batch))


def train(config, workdir: str, *, mesh=None, stop_after: int | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``config`` in ``workdir`` (resuming when it holds checkpoints).

    ``stop_after``: return once the state reaches that step (tests / benchmarks), leaving a
    checkpoint there. ``on_step(step, local_batch)`` is called after each step is dispatched.
    Returns a summary (final step, last metrics, paths).
    """
    if config.kind == "pipeline":
        return run_pipeline(config, workdir, mesh=mesh)
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, workdir, mesh)
    source = trainer.task.train_source() if hasattr(trainer.task, "train_source") \
        else data_lib.make_source(config.data)
    num_steps = num_train_steps(config, len(source), trainer.global_batch)
    trainer.build(num_steps)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    make_dataset = getattr(trainer.task, "train_dataset", data_lib.make_train_dataset)
    dataset = make_dataset(source, config.data, global_batch=trainer.global_batch,
                           num_steps=num_steps, seed=config.seed)
    data_iter = iter(dataset)
    mngr = make_checkpoint_manager(workdir, config)
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state = restore_checkpoint(mngr, trainer, latest)
        data_iter.set_state(data_state)
        log.info("resumed from %s at step %d", mngr.directory, latest)
    else:
        init_params = None
        if config.init_from:
            meta, loaded = load_param_dir(config.init_from)  # any kind: the task picks its part
            init_params = trainer.task.params_from_checkpoint(meta, loaded)
            log.info("initialised params from %s", config.init_from)
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
        with _Preemption() as preempt, jax.set_mesh(trainer.mesh), \
                nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            while step < num_steps:
                local_batch = next(data_iter)
                batch = trainer.to_device(local_batch)
                if logger is None:
                    fn = trainer.compile_step(state, batch)
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
                    if jax.process_index() == 0:
                        trainer.task.sample_grid(ema, source, os.path.join(
                            workdir, "samples", f"step_{step:07d}.png"), config.seed)
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
    """Final sample grid and export of the EMA params (by process 0, on its local devices)."""
    summary["step"] = int(jax.device_get(state["step"]))
    ema = host_params(state["ema"])
    summary["export"] = os.path.join(workdir, "export")
    if jax.process_index() == 0:
        summary["samples"] = trainer.task.sample_grid(
            ema, source, os.path.join(workdir, "samples", "final.png"), trainer.config.seed)
        trainer.task.export(ema, summary["export"])
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
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
    if config.score_digits and jax.process_index() == 0:
        from bitdance_jax.digits_score import score_samples
        samples = os.path.splitext(results[config.stages[-1]]["samples"])[0] + ".npz"
        with np.load(samples) as f:
            results["score"] = score_samples(f["images"], f["labels"])
        with open(os.path.join(workdir, "score.json"), "w") as f:
            json.dump(results["score"], f, indent=2)
        log.info("digits score (share of samples classified as their class): %.3f",
                 results["score"]["score"])
    return results


def main(argv=None):
    argv = sys.argv if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config, workdir, multihost = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    maybe_initialize_distributed(multihost)
    try:
        summary = train(config, workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

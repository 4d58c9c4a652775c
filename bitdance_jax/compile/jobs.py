"""The programs the compile tool lowers, built by the project's own code on any mesh: the trainer's jitted step (``Trainer.lower_step``) and the jitted samplers of both families, every input a ShapeDtypeStruct on its sharding."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from bitdance_jax.compile.analysis import per_chip_bytes
from bitdance_jax.parallel import sharding
from bitdance_jax.tokenizer.api import Tokenizer
from bitdance_jax.tokenizer.model import AE_D16C32, TokenizerConfig, abstract_tokenizer_params


@dataclasses.dataclass
class Job:
    """A lowered program and what the report says about its inputs."""
    lowered: object
    global_batch: int
    params: object              # the abstract params (ShapeDtypeStructs with shardings)
    arguments: dict             # per-chip bytes of each argument leaf, by path
    dtype: str                  # the matmul input dtype (for the peak FLOP/s)


def stand_in_tokenizer(config) -> Tokenizer:
    """The frozen tokenizer a config trains with, as shapes: ``config.tokenizer_dir``'s
    architecture where it names one (its params are read), else ae_d16c32 for ImageNet sizes
    and the digits tokenizer for small images. Only its shapes enter the program."""
    from bitdance_jax.tokenizer import io as tokenizer_io
    if config.get("tokenizer_dir"):
        tok_config = tokenizer_io.load(config.tokenizer_dir)[0]
    elif config.data.image_size > 64:
        tok_config = AE_D16C32
    else:
        from bitdance_jax.configs import digits_tokenizer
        tok_config = TokenizerConfig(**digits_tokenizer.get_config().tokenizer.to_dict())
    return Tokenizer(tok_config, nn.unbox(abstract_tokenizer_params(tok_config)))


def train_job(config, mesh) -> Job:
    """The trainer's step for ``config`` on ``mesh`` (its function, shardings and donation)."""
    from bitdance_jax.train.tasks import make_task
    from bitdance_jax.train.trainer import Trainer
    task = make_task(config, None, tokenizer=stand_in_tokenizer(config))
    trainer = Trainer(config, None, mesh=mesh, task=task).build(max(int(config.num_steps), 1))
    batch = task.abstract_batch(trainer.global_batch)
    lowered = trainer.lower_step(batch)
    state, frozen, batch = trainer.abstract_inputs(batch)
    return Job(lowered, trainer.global_batch, state["params"],
               per_chip_bytes({"state": state, "frozen": frozen, "batch": batch}),
               config.compute_dtype)


def _on(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def c2i_sample_job(config, mesh, batch: int, num_sampling_steps: int) -> Job:
    """The class-conditional sampler (``c2i.sampler.Sampler``) at ``batch`` images, guided."""
    from bitdance_jax.c2i.config import inference_config
    from bitdance_jax.c2i.model import init_params
    from bitdance_jax.c2i.sampler import Sampler
    from bitdance_jax.train.tasks.c2i import BitDanceTask
    task = BitDanceTask(config, None, tokenizer=stand_in_tokenizer(config))
    model_config = inference_config(task.model_config)
    sampler = Sampler(model_config, dtype=task.dtype, mesh=mesh, **_numerics(task.numerics))
    rep = sharding.replicated(mesh)
    params = nn.unbox(jax.eval_shape(lambda rng: init_params(model_config, rng), jax.random.PRNGKey(0)))
    params = _on(params, jax.tree.map(lambda _: rep, params))
    padded = -(-batch // sampler.num_shards) * sampler.num_shards
    rows = NamedSharding(mesh, PartitionSpec("data"))
    args = (params, jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
    lowered = sampler._program(padded, num_sampling_steps, True).lower(*args)
    return Job(lowered, padded, params, per_chip_bytes(args), config.compute_dtype)


def _numerics(numerics: dict) -> dict:
    return {"precision": numerics["precision"], "attention_impl": numerics["attention_impl"]}


def t2i_sample_job(config, mesh, height: int, width: int, num_sampling_steps: int,
                   batch: int = 1) -> Job:
    """The T2I sampler (``t2i.sampler.sampler``) at one image size with guidance, params
    placed as ``t2i.model.place_params`` puts them (bf16, the released models' dtype)."""
    from bitdance_jax.t2i import sampler as t2i_sampler
    from bitdance_jax.t2i.model import abstract_t2i_params
    from bitdance_jax.t2i.pipeline import T2IPipeline
    model_config = t2i_model_config(config)
    boxed = abstract_t2i_params(model_config, param_dtype=jnp.bfloat16)
    params = _on(nn.unbox(boxed), sharding.divisible_logical_sharding(boxed, mesh))
    pipe = T2IPipeline(model_config, params, text_tokenizer=None, dtype=config.compute_dtype)
    h, w = model_config.latent_grid(height, width)
    p = model_config.parallel_num
    rows = 2 * batch   # conditional + unconditional
    rep = sharding.replicated(mesh)
    bucket = t2i_sampler.prompt_bucket(1)
    noise = t2i_sampler.next_patch.KeyedNoise(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                                              jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep))
    args = (params, jax.ShapeDtypeStruct((rows, bucket), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((p,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((h * w // p, p, model_config.llm.hidden_size), jnp.float32,
                                 sharding=rep),
            noise, jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
    run = t2i_sampler.sampler(pipe.llm, pipe.head, pipe.projector, model_config.head.time_shift,
                              num_sampling_steps, True, False, None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        lowered = run.lower(*args)
    return Job(lowered, batch, params, per_chip_bytes(args), "bfloat16")


def t2i_model_config(config):
    """The T2IConfig of a T2I training config (its LLM, head and the tokenizer it names, or
    ae_d16c32's architecture), without reading data or text tokenizers."""
    from bitdance_jax.t2i import qwen3
    from bitdance_jax.t2i.config import T2IConfig
    if not config.llm.vocab_size:
        raise ValueError("compiling a T2I config needs config.llm.vocab_size (0 takes it from "
                         "the text tokenizer, which the compile tool does not read)")
    tok = stand_in_tokenizer(config)
    head = dict(config.head.to_dict(), ch_target=tok.config.z_channels,
                ch_cond=config.llm.hidden_size)
    return T2IConfig(llm=qwen3.Qwen3Config(**config.llm.to_dict()), head_kwargs=head,
                     tokenizer=tok.config)


def job_kind(config) -> str:
    if config.kind not in ("bitdance", "t2i"):
        raise ValueError(f"the compile tool compiles bitdance and t2i configs, not {config.kind!r}")
    return config.kind


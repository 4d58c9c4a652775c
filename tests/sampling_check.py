"""Shared by the sampling-precision tests: how many latent bits bf16-mixed sampling shares
with float32 sampling."""
import jax
import numpy as np

from bitdance_jax.c2i.sampler import Sampler
from bitdance_jax.parallel import sharding


def bit_agreement(config, params, classes, **kw):
    """(fraction of equal bits of float32 and bf16-mixed latents with the same seeds, the
    same for the first AR step's bits, number of bits); ``kw`` go to ``Sampler.sample``."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    f32 = Sampler(config, dtype="float32", mesh=mesh).sample(params, classes, **kw)
    bf16 = Sampler(config, dtype="bf16-mixed", mesh=mesh).sample(params, classes, **kw)
    assert set(np.unique(bf16)) <= {-1.0, 1.0}
    p = config.token_patch
    return float(np.mean(f32 == bf16)), float(np.mean(f32[:, :p, :p] == bf16[:, :p, :p])), f32.size

"""Abstract params: the shapes and dtypes of a module's param tree, without allocating it.

Below every model (their ``abstract_*_params``) and used by porting and loading to build
restore targets."""
from __future__ import annotations

import jax
from flax import linen as nn


def abstract_params(module: nn.Module, *example_args, method=None, **kwargs):
    """Boxed abstract params of ``module`` (no memory): ``jax.eval_shape`` of ``init``."""
    def init(rng, *args):
        return module.init(rng, *args, method=method, **kwargs)["params"]
    return jax.eval_shape(init, jax.random.key(0), *example_args)

"""Optional tokenizer training terms: a PatchGAN discriminator (adversarial) and an LPIPS-style
perceptual distance on the features of a frozen network.

The discriminator trains in the same jitted step and optimizer as the tokenizer. Its params
are a second group of the trained tree, and one scalar carries both games:
``generator_terms(stop_gradient(disc params)) + discriminator_terms(stop_gradient(recon))``,
so each group receives only the gradient of its own objective.

Perceptual networks are named ``"module.path:factory"``; ``factory()`` returns
``(apply_fn, params)`` with ``apply_fn(params, images_nhwc) -> [feature maps]`` and images in
[-1, 1]. The params are frozen (the task's ``frozen`` tree). To use real LPIPS features, port
the torchvision VGG16 conv weights (plus LPIPS' input scaling) into a small Flax VGG with
``bitdance_jax.porting.convert_state_dict`` and write a factory that loads them and returns
the relu1_2 ... relu5_3 activations; ``random_conv_features`` here is only a stand-in for
tests and smoke runs (no pretrained weights can be downloaded in this environment).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from bitdance_jax.nn.layers import conv, group_norm

Dtype = Any
ADVERSARIAL_LOSSES = ("hinge", "non_saturating")


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs with leaky ReLU, one real/fake logit per image patch.

    Group norm stands in for PatchGAN's batch norm so the module stays purely functional.
    """
    ch: int = 64
    num_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"discriminator expects NHWC images, got shape {images.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.ch, 4, stride=2, name="conv_in", **kw)(images.astype(self.dtype))
        x = nn.leaky_relu(x, 0.2)
        for i in range(1, self.num_layers + 1):
            features = self.ch * min(2 ** i, 8)
            stride = 2 if i < self.num_layers else 1
            x = conv(features, 4, stride=stride, use_bias=False, name=f"convs_{i - 1}", **kw)(x)
            x = group_norm(num_groups=min(32, features), name=f"norms_{i - 1}",
                           param_dtype=self.param_dtype)(x)
            x = nn.leaky_relu(x, 0.2)
        return conv(1, 4, name="conv_out", **kw)(x).astype(jnp.float32)


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       kind: str = "hinge") -> jax.Array:
    """The discriminator's objective: high logits on real patches, low on reconstructions."""
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits))
                      + jnp.mean(jax.nn.relu(1.0 + fake_logits)))
    if kind == "non_saturating":
        return 0.5 * (jnp.mean(jax.nn.softplus(-real_logits))
                      + jnp.mean(jax.nn.softplus(fake_logits)))
    raise ValueError(f"unknown adversarial loss {kind!r}; use one of {ADVERSARIAL_LOSSES}")


def generator_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """The tokenizer's adversarial objective: make reconstructions look real."""
    if kind == "hinge":
        return -jnp.mean(fake_logits)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake_logits))
    raise ValueError(f"unknown adversarial loss {kind!r}; use one of {ADVERSARIAL_LOSSES}")


def adversarial_losses(discriminator: nn.Module, disc_params, images: jax.Array,
                       recon: jax.Array, *, kind: str = "hinge", active=True
                       ) -> tuple[jax.Array, jax.Array]:
    """(generator term, discriminator term), each exactly 0 where ``active`` is False.

    The generator term sees the discriminator params through stop_gradient, the discriminator
    term sees the reconstructions through stop_gradient: summed, each param group gets only
    its own gradient. ``active`` may be traced (the step compared with the start step).
    """
    frozen_disc = jax.lax.stop_gradient(disc_params)
    gen = generator_loss(discriminator.apply({"params": frozen_disc}, recon), kind)
    both = jnp.concatenate([images, jax.lax.stop_gradient(recon)], axis=0)
    logits = discriminator.apply({"params": disc_params}, both)
    real, fake = jnp.split(logits, 2, axis=0)
    disc = discriminator_loss(real, fake, kind)
    zero = jnp.zeros((), jnp.float32)
    return jnp.where(active, gen, zero), jnp.where(active, disc, zero)


# ---------------------------------------------------------------------------------------
# Perceptual distance.

def perceptual_distance(features_a: Sequence[jax.Array], features_b: Sequence[jax.Array],
                        eps: float = 1e-10) -> jax.Array:
    """LPIPS-style: per layer, features unit-normalised over channels, squared difference
    averaged over space and channels; summed over layers (0 for identical inputs)."""
    if len(features_a) != len(features_b) or not features_a:
        raise ValueError(f"expected the same non-zero number of feature maps, got "
                         f"{len(features_a)} and {len(features_b)}")
    total = jnp.zeros((), jnp.float32)
    for fa, fb in zip(features_a, features_b):
        fa, fb = fa.astype(jnp.float32), fb.astype(jnp.float32)
        na = fa / (jnp.sqrt(jnp.sum(fa ** 2, axis=-1, keepdims=True)) + eps)
        nb = fb / (jnp.sqrt(jnp.sum(fb ** 2, axis=-1, keepdims=True)) + eps)
        total = total + jnp.mean((na - nb) ** 2)
    return total


def load_feature_network(name: str) -> tuple[Callable, Any]:
    """``"module.path:factory"`` -> ``factory()`` = (apply_fn, frozen params)."""
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise ValueError(f"perceptual network {name!r} must be written 'module.path:factory'")
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"perceptual network {name!r}: cannot import {module_name!r} ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"perceptual network {name!r}: {module_name} has no factory {attr!r}")
    out = factory()
    if not (isinstance(out, tuple) and len(out) == 2 and callable(out[0])):
        raise ValueError(f"perceptual network {name!r}: the factory must return "
                         f"(apply_fn, params)")
    return out


class RandomConvFeatures(nn.Module):
    """A few strided 3x3 convs + ReLU; every activation is a feature map."""
    channels: Sequence[int] = (16, 32, 32)

    @nn.compact
    def __call__(self, images: jax.Array) -> list[jax.Array]:
        feats, x = [], images
        for i, ch in enumerate(self.channels):
            x = nn.relu(conv(ch, 3, stride=1 if i == 0 else 2, name=f"convs_{i}")(x))
            feats.append(x)
        return feats


def random_conv_features(seed: int = 0, channels: Sequence[int] = (16, 32, 32)):
    """Stand-in perceptual network for tests and smoke runs: random-init frozen convs (no
    pretrained VGG is available offline). Returns (apply_fn, params)."""
    net = RandomConvFeatures(tuple(channels))
    params = nn.unbox(net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))["params"])
    return (lambda p, images: net.apply({"params": p}, images)), params

"""Tokenizer perceptual and adversarial terms: gradient separation of the two param groups,
the start step, the perceptual distance, a few trainer steps and the exported tokenizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bitdance_jax.parallel import sharding
from bitdance_jax.tokenizer import losses as tokenizer_losses
from bitdance_jax.train.tasks.tokenizer import TokenizerTask
from bitdance_jax.train import trainer as train
from bitdance_jax.configs.common import base_config, tokenizer_config

RANDOM_FEATURES = "bitdance_jax.tokenizer.losses:random_conv_features"


def tiny_config(**loss):
    c = base_config("tokenizer")
    c.tokenizer = tokenizer_config(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=8,
                                   num_codebooks=2)
    c.data.image_size = 8
    c.data.num_threads = 1
    c.global_batch_size = 8
    c.num_steps = 3
    c.optim.warmup_steps = 1
    c.optim.decay_start = 2
    c.log_every = 1
    c.checkpoint.every_steps = 10
    c.checkpoint.async_save = False
    c.tokenizer_loss.discriminator_ch = 8
    c.tokenizer_loss.discriminator_layers = 2
    c.tokenizer_loss.update(loss)
    return c


def both_terms(start=0):
    return tiny_config(adversarial_weight=0.5, adversarial_start_step=start,
                       perceptual_weight=1.0, perceptual_network=RANDOM_FEATURES)


def example_batch(config, seed=0):
    size = config.data.image_size
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (4, size, size, 3)).astype(np.uint8)}


def task_and_params(config):
    task = TokenizerTask(config)
    return task, nn.unbox(task.init(jax.random.PRNGKey(0)))


def nonzero(tree):
    return any(bool(np.any(np.asarray(g) != 0)) for g in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("kind", tokenizer_losses.ADVERSARIAL_LOSSES)
def test_each_param_group_gets_only_its_own_gradient(kind):
    config = both_terms()
    config.tokenizer_loss.adversarial_loss = kind
    task, params = task_and_params(config)
    frozen, batch, rng = task.frozen(), example_batch(config), jax.random.PRNGKey(1)

    def term(name):
        return lambda p: task.loss(p, frozen, batch, rng, step=0)[1][name]

    @jax.jit
    def grads(p):
        return (jax.grad(term("generator_adversarial"))(p), jax.grad(term("discriminator"))(p),
                jax.grad(lambda q: task.loss(q, frozen, batch, rng, step=0)[0])(p))

    gen_grads, disc_grads, total = grads(params)
    assert nonzero(gen_grads["tokenizer"]) and not nonzero(gen_grads["discriminator"])
    assert nonzero(disc_grads["discriminator"]) and not nonzero(disc_grads["tokenizer"])
    # The combined loss: the discriminator's gradient is exactly that of its own term.
    w = config.tokenizer_loss.discriminator_weight
    jax.tree.map(lambda t, d: np.testing.assert_allclose(t, w * d, rtol=1e-5, atol=1e-7),
                 total["discriminator"], disc_grads["discriminator"])


@pytest.mark.slow
def test_adversarial_terms_are_zero_before_the_start_step():
    config = both_terms(start=5)
    task, params = task_and_params(config)
    frozen, batch, rng = task.frozen(), example_batch(config), jax.random.PRNGKey(1)
    loss = jax.jit(lambda p, s: task.loss(p, frozen, batch, rng, step=s))
    _, before = loss(params, jnp.int32(4))
    _, after = loss(params, jnp.int32(5))
    assert float(before["generator_adversarial"]) == 0.0 and float(before["discriminator"]) == 0.0
    assert float(after["discriminator"]) > 0.0 and float(after["generator_adversarial"]) != 0.0
    disc_grads = jax.grad(lambda p: loss(p, jnp.int32(4))[0])(params)["discriminator"]
    assert not nonzero(disc_grads)


def test_perceptual_distance_zero_for_identical_images_positive_otherwise():
    apply_fn, params = tokenizer_losses.random_conv_features()
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    b = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    fa, fb = apply_fn(params, a), apply_fn(params, b)
    assert float(tokenizer_losses.perceptual_distance(fa, apply_fn(params, a))) == 0.0
    assert float(tokenizer_losses.perceptual_distance(fa, fb)) > 0.0


@pytest.mark.parametrize("name", ["no_colon", "a:b:c", ":factory", "bitdance_jax.nope:f",
                                  "bitdance_jax.tokenizer.losses:nope"])
def test_bad_perceptual_network_name_is_a_value_error(name):
    with pytest.raises(ValueError, match="perceptual network"):
        tokenizer_losses.load_feature_network(name)
    with pytest.raises(ValueError, match="perceptual network"):
        TokenizerTask(tiny_config(perceptual_weight=1.0, perceptual_network=name))


def test_default_config_keeps_the_tokenizer_param_tree():
    config = tiny_config()
    task, params = task_and_params(config)
    assert "discriminator" not in params and "encoder" in params and "decoder" in params
    assert task.frozen() == {}
    _, aux = task.loss(params, {}, example_batch(config), jax.random.PRNGKey(1), 0)
    assert set(aux) == {"l1", "l2", "entropy_aux", "commitment", "codebook_entropy"}
    adv_task, adv_params = task_and_params(both_terms())
    assert set(adv_params) == {"tokenizer", "discriminator"}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), adv_params["tokenizer"], params)


@pytest.mark.slow
def test_trainer_steps_with_both_terms_and_the_export_loads(tmp_path):
    from bitdance_jax.checkpointing.param_dir import load_param_dir
    from bitdance_jax.tokenizer.api import load_tokenizer
    config = both_terms(start=1)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    summary = train.train(config, str(tmp_path / "run"), mesh=mesh)
    assert summary["step"] == config.num_steps
    assert np.isfinite(summary["metrics"]["discriminator"])
    assert summary["metrics"]["perceptual"] > 0
    tok = load_tokenizer(summary["export"])
    images = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
    assert tok.encode(images).shape[-1] == config.tokenizer.z_channels
    # A new adversarial run starts from the exported tokenizer with a fresh discriminator.
    meta, loaded = load_param_dir(summary["export"])
    trainer = train.Trainer(config, str(tmp_path / "again"), mesh).build(config.num_steps)
    state = jax.device_get(trainer.init_state(trainer.task.params_from_checkpoint(meta, loaded)))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), state["params"]["tokenizer"],
                 loaded)
    assert set(state["params"]) == {"tokenizer", "discriminator"}

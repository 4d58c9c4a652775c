"""Scanned layers and rematerialisation change memory, compile time and the param layout,
never results: losses, gradients, a sharded training step and sampling equal the plain model's."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bitdance_jax.data import sources
from bitdance_jax.data import pipeline as data_lib
from bitdance_jax.porting import convention as porting
from bitdance_jax.parallel import sharding
from bitdance_jax.train import trainer as train
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.loss import bitdance_loss
from bitdance_jax.c2i.model import abstract_backbone_params, from_unscanned, init_params, stack_layer_params, to_unscanned, unstack_layer_params
from bitdance_jax.train.optimizer import weight_decay_mask
from bitdance_jax.configs.common import base_config

# 3 layers so that the stacking order matters; standard and patch orders both covered.
CONFIG = BitDanceConfig(dim=32, n_layer=3, n_head=2, diff_layers=1, diff_dim=64,
                        diff_adanln_layers=1, latent_dim=8, grid_size=4, cls_token_num=2,
                        num_classes=5, parallel_num=4, diff_batch_mul=2)


def random_params(config, seed=0):
    """Unscanned params with O(1) random values (fresh init leaves the norms at exactly 1)."""
    rng = np.random.default_rng(seed)
    boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                        nn.unbox(boxed))


def loss_and_grads(params, config):
    rng = np.random.default_rng(1)
    b = 2
    latents = np.sign(rng.standard_normal((b, config.grid_size, config.grid_size,
                                           config.latent_dim))).astype(np.float32)
    rows = b * config.num_tokens // config.parallel_num * config.diff_batch_mul
    t_raw = rng.standard_normal(rows).astype(np.float32)
    noise = rng.standard_normal((rows, config.parallel_num, config.latent_dim)).astype(np.float32)
    fn = lambda p: bitdance_loss(p, latents, np.array([1, 4], np.int32), config=config,
                                 t_raw=t_raw, noise=noise)
    return jax.jit(jax.value_and_grad(fn))(params)


@functools.lru_cache(maxsize=1)
def plain_loss_and_grads():
    """The reference of every comparison: the unscanned model without remat."""
    return jax.device_get(loss_and_grads(random_params(CONFIG), CONFIG))


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=rtol, atol=atol), a, b)


@pytest.mark.slow
def test_scanned_loss_and_grads_equal_unscanned():
    params = random_params(CONFIG)
    scanned = dataclasses.replace(CONFIG, scan_layers=True)
    loss, grads = plain_loss_and_grads()
    loss_s, grads_s = loss_and_grads(from_unscanned(params, scanned), scanned)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    assert "layers" in grads_s["model"] and "layers_0" not in grads_s["model"]
    # The scanned body fuses differently, so float32 sums are reassociated: gradients of
    # size ~1 may differ by a few ulps (seen: 1.6e-6 on one of 512 entries since the float32
    # norms and the attention helper landed).
    assert_close(to_unscanned(grads_s, scanned), grads, atol=3e-6)


def test_remat_keeps_loss_and_grads():
    loss, grads = plain_loss_and_grads()
    loss_r, grads_r = loss_and_grads(random_params(CONFIG), dataclasses.replace(CONFIG, remat="full"))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    assert_close(grads_r, grads)


def test_remat_leaves_the_layout_alone():
    plain = jax.tree.map(jnp.shape, nn.unbox(abstract_backbone_params(CONFIG)))
    remat = dataclasses.replace(CONFIG, remat="full")
    assert jax.tree.map(jnp.shape, nn.unbox(abstract_backbone_params(remat))) == plain


def test_stack_unstack_round_trip_and_scanned_init_layout():
    model = random_params(CONFIG)["model"]
    stacked = stack_layer_params(model, CONFIG.n_layer)
    for i in range(CONFIG.n_layer):
        np.testing.assert_array_equal(stacked["layers"]["attention"]["wqkv"]["kernel"][i],
                                      model[f"layers_{i}"]["attention"]["wqkv"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, unstack_layer_params(stacked), model)
    scanned = dataclasses.replace(CONFIG, scan_layers=True)
    fresh = nn.unbox(jax.eval_shape(lambda: init_params(scanned, jax.random.PRNGKey(0))))
    assert jax.tree.map(jnp.shape, fresh["model"]) == jax.tree.map(jnp.shape, stacked)
    with pytest.raises(ValueError, match="missing"):
        stack_layer_params(model, CONFIG.n_layer + 1)
    with pytest.raises(ValueError, match="more than"):
        stack_layer_params(model, CONFIG.n_layer - 1)
    with pytest.raises(ValueError, match="no 'layers'"):
        unstack_layer_params(model)
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(CONFIG, remat="some")


def test_scanned_params_carry_the_layers_axis_and_shard_on_a_mesh():
    """Also the scan + 'dots' remat combination: its sharded loss and grads are the plain ones."""
    scanned = dataclasses.replace(CONFIG, scan_layers=True, remat="dots")
    boxed = jax.eval_shape(lambda: init_params(scanned, jax.random.PRNGKey(0)))
    names = nn.get_partition_spec(boxed)["model"]["layers"]
    assert names["attention"]["wqkv"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads")
    assert names["ffn_norm"]["scale"] == jax.sharding.PartitionSpec("layers", "norm")
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.divisible_logical_sharding(boxed, mesh)
    assert shardings["model"]["layers"]["feed_forward"]["w1"]["kernel"].spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    params = from_unscanned(random_params(CONFIG), scanned)
    placed = jax.device_put(params, shardings)
    kernel = placed["model"]["layers"]["feed_forward"]["w1"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (
        CONFIG.n_layer, CONFIG.dim // 2, kernel.shape[-1] // 2)
    with jax.set_mesh(mesh):
        loss, grads = loss_and_grads(placed, scanned)
    want_loss, want_grads = plain_loss_and_grads()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    # sharded reductions sum in another order: float-level differences
    assert_close(to_unscanned(jax.device_get(grads), scanned), want_grads, rtol=1e-4, atol=1e-5)


def test_weight_decay_mask_follows_the_layer_not_the_stack():
    model = random_params(CONFIG)["model"]
    mask = weight_decay_mask(model)
    scanned_mask = weight_decay_mask(stack_layer_params(model, CONFIG.n_layer))
    assert scanned_mask["layers"] == mask["layers_0"]
    assert scanned_mask["layers"]["attention_norm"]["scale"] is False


def test_porting_gives_the_configured_layout():
    sd = {k: np.random.default_rng(3).standard_normal(shape).astype(np.float32)
          for k, shape in porting.expected_torch_shapes(abstract_backbone_params(CONFIG)).items()}
    from bitdance_jax.nn.diffusion_head import abstract_head_params
    sd.update({"head.net." + k: np.zeros(s, np.float32) for k, s in
               porting.expected_torch_shapes(abstract_head_params(CONFIG.head_config)).items()})
    from bitdance_jax.porting.c2i import port_model_state_dict
    plain = port_model_state_dict(sd, CONFIG)
    scanned = port_model_state_dict(sd, dataclasses.replace(CONFIG, scan_layers=True))
    jax.tree.map(np.testing.assert_array_equal, scanned["model"],
                 stack_layer_params(plain["model"], CONFIG.n_layer))


def test_sampler_takes_scanned_params():
    from bitdance_jax.c2i.sampler import Sampler
    params = random_params(CONFIG)
    scanned = dataclasses.replace(CONFIG, scan_layers=True, remat="full")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    kw = dict(seed=0, cfg_scale=2.0, num_sampling_steps=2)
    want = Sampler(CONFIG, mesh=mesh).sample(params, [1, 3], **kw)
    got = Sampler(scanned, mesh=mesh).sample(from_unscanned(params, scanned), [1, 3], **kw)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_trainer_step_with_scan_and_remat_and_unscanned_export(tmp_path):
    """The trainer runs a step of a scan + remat model (tokenizer encoding inside the step);
    its export holds the unscanned layout, which a scanned run takes back as init."""
    from bitdance_jax.checkpointing.param_dir import load_param_dir
    from bitdance_jax.c2i.api import KIND
    from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig
    from bitdance_jax.tokenizer.api import save_tokenizer
    tok = TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, num_codebooks=2)
    rng = np.random.default_rng(4)
    tok_params = jax.tree.map(    # random weights: building them eagerly takes seconds
        lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
        nn.unbox(jax.eval_shape(lambda: BinaryAutoencoder(tok).init(
            jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"])))
    c = base_config("bitdance")
    c.tokenizer_dir = save_tokenizer(str(tmp_path / "tok"), tok, tok_params)
    c.model.update(dict(dim=32, n_layer=2, n_head=2, diff_layers=1, diff_dim=64,
                        diff_adanln_layers=1, num_classes=10, parallel_num=4, cls_token_num=2,
                        diff_batch_mul=2, scan_layers=True, remat="full"))
    c.data.image_size = 8
    c.data.num_threads = 1
    c.global_batch_size = 8
    source = sources.make_source(c.data)
    local = next(iter(data_lib.make_train_dataset(source, c.data, global_batch=8, num_steps=1,
                                                  seed=0)))
    trainer = train.Trainer(c, str(tmp_path), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.build(4)
    state = trainer.init_state()
    before = jax.device_get(state["params"])["model"]["layers"]["attention"]["wqkv"]["kernel"]
    batch = trainer.to_device(local)
    with jax.set_mesh(trainer.mesh):   # the step donates ``state``
        new_state, metrics = trainer.compile_step(batch)(state, trainer.frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    params = jax.device_get(new_state["params"])
    assert not np.allclose(params["model"]["layers"]["attention"]["wqkv"]["kernel"], before)

    meta, saved = load_param_dir(trainer.task.export(params, str(tmp_path / "export")), KIND)
    assert meta["config"]["scan_layers"] is False and meta["config"]["remat"] == "full"
    config = trainer.task.model_config
    jax.tree.map(np.testing.assert_array_equal, {k: saved[k] for k in ("model", "head")},
                 to_unscanned(params, config))
    init = trainer.task.params_from_checkpoint(meta, saved)
    trainer.check_params(init)
    jax.tree.map(np.testing.assert_array_equal, init, params)

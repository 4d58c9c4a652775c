"""bf16-mixed against float32: where the policy keeps float32, one training step, and a
200-step digits run (``pytest -s`` prints the losses).

bf16-mixed = float32 params, optimizer state, residual stream, norms, softmax and loss; bf16
matmul inputs (``bitdance_jax.nn.precision``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.loss import bitdance_loss
from bitdance_jax.c2i.model import BitDanceBackbone, init_params
from bitdance_jax.configs import digits_bitdance
from bitdance_jax.parallel import sharding
from bitdance_jax.train import trainer as train
from sampling_check import bit_agreement

pytestmark = pytest.mark.usefixtures("compilation_cache")

CONFIG = BitDanceConfig(dim=64, n_layer=1, n_head=4, diff_layers=1, diff_dim=64,
                        diff_adanln_layers=1, latent_dim=8, grid_size=4, cls_token_num=2,
                        num_classes=10, parallel_num=4, diff_batch_mul=2)


def nontrivial_params(config, seed=0):
    """A fresh init with the zero-initialised layers (adaLN, final layer, biases) made
    N(0, 0.02): the head's output then depends on the network, as after a few steps."""
    def make(rng):
        params = nn.unbox(init_params(config, rng))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
        leaves = [jnp.where(jnp.any(x != 0), x, 0.02 * jax.random.normal(k, x.shape))
                  for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, leaves)
    return jax.device_get(jax.jit(make)(jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def params():
    return nontrivial_params(CONFIG)


def loss_inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    latents = np.sign(rng.standard_normal((4, config.grid_size, config.grid_size,
                                           config.latent_dim))).astype(np.float32)
    return jnp.asarray(latents), jnp.asarray(rng.integers(0, config.num_classes, 4), jnp.int32)


def walk(jaxpr):
    """Every equation of a (closed) jaxpr, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)


def test_bf16_mixed_keeps_float32_where_the_reference_does(params):
    latents, ids = loss_inputs(CONFIG)
    loss = lambda p: bitdance_loss(p, latents, ids, jax.random.PRNGKey(0), config=CONFIG,
                                   dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
    eqns = list(walk(jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    fwd = [e for e in walk(jax.make_jaxpr(loss)(params).jaxpr) if e.primitive.name == "dot_general"]
    # every forward matmul takes bf16 inputs; the attention logits come out float32
    assert fwd and all(v.aval.dtype == jnp.bfloat16 for e in fwd for v in e.invars)
    assert any(e.outvars[0].aval.dtype == jnp.float32 for e in fwd)
    assert len(dots) > len(fwd)
    # softmax and timestep features (exp), norms (rsqrt), the loss: float32
    for name in ("exp", "rsqrt", "reduce_max", "log"):
        for e in (e for e in eqns if e.primitive.name == name):
            assert e.outvars[0].aval.dtype == jnp.float32, (name, e)
    # the residual stream and the head conditioning are float32
    hidden = jax.eval_shape(lambda p: BitDanceBackbone(CONFIG, dtype=jnp.bfloat16).apply(
        {"params": p["model"]}, jnp.asarray(
            latents.reshape(4, -1, CONFIG.latent_dim)), ids), params)
    assert hidden.dtype == jnp.float32
    # gradients arrive float32 (params stay float32)
    grads = jax.eval_shape(jax.grad(loss), params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_bf16_mixed_loss_and_grads_match_float32(params):
    latents, ids = loss_inputs(CONFIG)
    results = {}
    for name, dtype in (("float32", jnp.float32), ("bf16-mixed", jnp.bfloat16)):
        loss = lambda p: bitdance_loss(p, latents, ids, jax.random.PRNGKey(3), config=CONFIG,
                                       dtype=dtype, precision="highest")
        results[name] = jax.jit(jax.value_and_grad(loss))(params)
    (l32, g32), (l16, g16) = results["float32"], results["bf16-mixed"]
    rel = abs(float(l16) / float(l32) - 1)
    g32, g16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    grad_rel = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
    print(f"\nloss float32 {float(l32):.6f}  bf16-mixed {float(l16):.6f}  rel {rel:.1e}; "
          f"grad rel err {grad_rel:.1e}")
    assert rel < 1e-2
    assert grad_rel < 5e-2


def tiny_tokenizer_dir(tmp_path, image_size):
    """An untrained tokenizer 16x16 -> 4x4 x 8 bits (random convs still give a
    deterministic, learnable code per image)."""
    from bitdance_jax.tokenizer.api import save_tokenizer
    from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig
    tok = TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                          num_codebooks=2)
    params = nn.unbox(jax.jit(BinaryAutoencoder(tok).init)(
        jax.random.PRNGKey(1), np.zeros((1, image_size, image_size, 3), np.float32))["params"])
    return save_tokenizer(str(tmp_path / "tok"), tok, params)


def digits_config(tmp_path, precision, num_steps, tokenizer_dir):
    """configs/digits_bitdance.py, shrunk for 2 CPU cores: 16x16 digits through a tiny
    tokenizer (4x4 x 8-bit latents, cached), a 2-layer dim-64 model, batch 32."""
    c = digits_bitdance.get_config()
    c.tokenizer_dir = tokenizer_dir
    c.model.update(dict(dim=64, n_layer=2, n_head=4, diff_layers=1, diff_dim=64,
                        diff_adanln_layers=1, cls_token_num=2, precision=precision))
    c.data.image_size = 16
    c.data.num_threads = 1
    c.data.cache_dir = str(tmp_path / "latents")
    c.global_batch_size = 32
    c.num_steps = num_steps
    c.optim.update(dict(warmup_steps=20, decay_start=num_steps // 2))
    return c


def run_steps(config, workdir, num_steps, init_params=None):
    """Per-step losses of ``num_steps`` training steps on one device, and the final state."""
    trainer = train.Trainer(config, str(workdir), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    source = trainer.task.train_source()
    trainer.build(num_steps)
    data = iter(trainer.task.train_dataset(source, config.data, global_batch=trainer.global_batch,
                                           num_steps=num_steps, seed=config.seed))
    state = trainer.init_state(init_params)
    losses, fn = [], None
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        for _ in range(num_steps):
            batch = trainer.to_device(next(data))
            fn = fn or trainer.compile_step(batch)
            state, metrics = fn(state, trainer.frozen, batch)
            losses.append(metrics["loss"])
    return np.asarray(jax.device_get(losses)), jax.device_get(state)


@pytest.mark.slow
def test_bf16_mixed_200_digits_steps_reach_the_float32_loss(tmp_path):
    """200 trainer steps from the same init and data: the first step's loss within 1e-2
    relative (the head's own bf16 matmuls at non-trivial params are checked by
    test_bf16_mixed_loss_and_grads_match_float32), the mean loss of the last 50 steps within
    5%, params, optimizer state and EMA kept in float32."""
    tok = tiny_tokenizer_dir(tmp_path, 16)
    steps = 200
    means, states, firsts = {}, {}, {}
    for precision in ("float32", "bf16-mixed"):
        config = digits_config(tmp_path, precision, steps, tok)
        losses, states[precision] = run_steps(config, tmp_path / precision, steps)
        assert np.isfinite(losses).all()
        means[precision] = (float(losses[:10].mean()), float(losses[-50:].mean()))
        firsts[precision] = float(losses[0])
    step1 = abs(firsts["bf16-mixed"] / firsts["float32"] - 1)
    print(f"\nfirst step: loss float32 {firsts['float32']:.6f}  bf16-mixed "
          f"{firsts['bf16-mixed']:.6f}  rel {step1:.1e}")
    assert step1 < 1e-2
    for tree in (states["bf16-mixed"][k] for k in ("params", "opt_state", "ema")):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert {x.dtype for x in floats} == {np.dtype(np.float32)}
    (first32, last32), (first16, last16) = means["float32"], means["bf16-mixed"]
    rel = abs(last16 / last32 - 1)
    print(f"{steps} digits steps, mean loss of steps 1-10 -> last 50: float32 {first32:.4f} -> "
          f"{last32:.4f}, bf16-mixed {first16:.4f} -> {last16:.4f} (rel {rel:.2%})")
    assert last32 < 0.9 * first32   # it learns
    assert rel < 0.05
    # sampling the float32-trained model in bf16-mixed: the bits agree with float32 sampling
    arch = train.Trainer(config, str(tmp_path),
                         sharding.make_mesh((1, 1, 1), jax.devices()[:1])).task.model_config
    agreement, first, bits = bit_agreement(arch, states["float32"]["params"], list(range(10)) * 2,
                                           seed=0, cfg_scale=3.0, num_sampling_steps=25)
    print(f"digits model after {steps} steps: bf16-mixed vs float32 latents agree on "
          f"{agreement:.2%} of {bits} bits ({first:.2%} in the first AR step)")
    assert agreement >= 0.99


def test_tokenizer_task_takes_matmul_precision(tmp_path):
    """The tokenizer kind reads the top-level ``matmul_precision`` (the bitdance kind keeps it
    in sync with ``model.matmul_precision``); an unknown name is an error."""
    from bitdance_jax.configs import digits_tokenizer
    from bitdance_jax.train.tasks.tokenizer import TokenizerTask
    config = digits_tokenizer.get_config()
    config.matmul_precision = "highest"
    assert TokenizerTask(config, str(tmp_path)).model.precision == "highest"
    config.matmul_precision = "exact"
    with pytest.raises(ValueError, match="unknown matmul_precision 'exact'"):
        TokenizerTask(config, str(tmp_path))
    bitdance = digits_bitdance.get_config()
    bitdance.model.matmul_precision = "high"
    assert bitdance.matmul_precision == "high"

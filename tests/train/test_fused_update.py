"""AdamWRecipe.fused_update against the optax chain it replaces in the train step (clip, AdamW
with masked decay, apply, EMA, keep-the-old-state on a non-finite step), and its compiled
form: one loop per new leaf, no copies."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitdance_jax.train import optimizer as optim

EMA_DECAY = 0.9


def small_params():
    """Decayed leaves (2-D kernels, a stacked 3-D kernel) and undecayed ones (biases, a
    stacked scale, a no-decay module)."""
    shapes = {"model": {"layers": {"kernel": (3, 4, 5), "scale": (3, 5)}},
              "proj_in": {"kernel": (4, 4)}, "head": {"kernel": (5, 6), "bias": (6,)}}
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def optax_update(optimizer, grads, params, ema, opt_state, ok):
    """The train step's update before the fused one: chain, apply, EMA, then keep the old
    state where the step is not ok."""
    grad_norm = optax.tree.norm(grads)
    ok = ok & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_ema = jax.tree.map(lambda e, p: EMA_DECAY * e + (1.0 - EMA_DECAY) * p, ema, new_params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return keep(new_params, params), keep(new_ema, ema), keep(new_opt, opt_state), ok


def fused_update(recipe, grads, params, ema, opt_state, ok):
    grad_norm = optax.tree.norm(grads)
    ok = ok & jnp.isfinite(grad_norm)
    return (*recipe.fused_update(grads, grad_norm, ok, params, ema, opt_state, EMA_DECAY), ok)


def assert_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("clip_norm,weight_decay", [(1.0, 0.05), (0.0, 0.05), (1.0, 0.0)])
def test_matches_the_optax_chain_and_keeps_the_state_on_a_non_finite_step(clip_norm, weight_decay):
    recipe = optim.AdamWRecipe(
        schedule=optim.lr_schedule(0.1, warmup_steps=2, decay_start=3, total_steps=6),
        eps=1e-6, weight_decay=weight_decay, clip_norm=clip_norm)
    params = small_params()
    state = {"old": (params, params, recipe.transformation().init(params), jnp.bool_(True))}
    state["new"] = state["old"]
    step_old = jax.jit(lambda *a: optax_update(recipe.transformation(), *a))
    step_new = jax.jit(lambda *a: fused_update(recipe, *a))
    # Gradient scales: clipped (norm > 1), not clipped, clipped, then a NaN from step 3 on.
    for i, scale in enumerate([3.0, 0.01, 2.0, np.nan, 1.0]):
        grads = jax.tree.map(lambda p: scale * jnp.sin(p * (i + 2)), params)
        before = state["new"]
        state = {"old": step_old(grads, *state["old"]), "new": step_new(grads, *state["new"])}
        assert_close(state["new"], state["old"])
        if not np.isfinite(scale):
            assert_close(state["new"][:3], before[:3])
            assert not state["new"][3]
    # The chain moved every leaf, and the decay mask made a difference where it applies.
    assert all(np.all(np.asarray(a) != np.asarray(b))
               for a, b in zip(jax.tree.leaves(state["new"][0]), jax.tree.leaves(params)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU fusion decisions")
def test_each_new_leaf_is_one_loop_without_copies():
    recipe = optim.AdamWRecipe(schedule=optim.lr_schedule(0.1, warmup_steps=2, decay_start=0,
                                                          total_steps=6))
    params = {"kernel": jnp.zeros((48, 80)), "bias": jnp.zeros((80,))}
    opt_state = recipe.transformation().init(params)

    def update(grads, params, ema, opt_state, ok):
        return fused_update(recipe, grads, params, ema, opt_state, ok)

    compiled = jax.jit(update, donate_argnums=(1, 2, 3)).lower(
        params, params, params, opt_state, jnp.bool_(True)).compile().as_text()
    entry = compiled[compiled.index("ENTRY"):].splitlines()
    producing_kernel = [line for line in entry if " = f32[48,80]{1,0} " in line]
    ops = [line.split(" = f32[48,80]{1,0} ")[1].split("(")[0] for line in producing_kernel]
    # Besides the 5 inputs (grads, params, ema, mu, nu) and the norm's square of the grads:
    # one loop each for mu, nu, params and EMA, each with its keep-the-old-state select.
    assert sorted(ops) == ["fusion"] * 5 + ["parameter"] * 5, producing_kernel
    loops = [line for line in producing_kernel if "_where" in line]
    assert len(loops) == 4, producing_kernel
    # Each loop reads its old leaf and one or two full-size arrays: grads (mu, nu), the new
    # mu and nu (params), the new params (EMA); no loop recomputes from further inputs.
    names = {line.split()[0] for line in producing_kernel}
    reads = sorted(sum(operand.strip() in names
                       for operand in line.split("fusion(")[1].split(")")[0].split(","))
                   for line in loops)
    assert reads == [2, 2, 2, 3], loops

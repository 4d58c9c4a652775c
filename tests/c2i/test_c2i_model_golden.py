"""The ported class-conditional models reproduce the reference: teacher-forced forward,
loss with recorded draws, and whole sampling runs (zero noise and recorded noise)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden
from bitdance_jax.nn import patching
from bitdance_jax.porting import convention as porting
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.loss import bitdance_loss
from bitdance_jax.c2i.model import BitDanceBackbone
from bitdance_jax.porting.c2i import infer_config, port_model_state_dict
from bitdance_jax.c2i.sampler import generate
from bitdance_jax.tokenizer.model import TokenizerConfig
from bitdance_jax.tokenizer.api import Tokenizer
from bitdance_jax.porting.tokenizer import port_tokenizer_state_dict

HIGHEST = golden.MATMUL_PRECISION
AR_CASES = ["ar_parallel", "ar_parallel_standard", "ar_1x"]
SCHEDULE = ("parallel_mode", "diff_batch_mul", "time_shift", "P_mean", "P_std")


@functools.lru_cache(maxsize=None)
def load_case(case_name):
    """(config, params {"model", "head"}, tokenizer) of a golden AR case (EMA weights)."""
    conf = golden.case(case_name)["config"]
    config = BitDanceConfig.from_reference_kwargs(conf["model_kwargs"])
    ckpt = porting.load_torch_file(golden.path(golden.case(case_name)["weight_files"][0]))
    sd = porting.tensors_to_numpy(ckpt["ema"])
    overrides = {k: getattr(config, k) for k in SCHEDULE + ("n_head",)}
    assert infer_config(sd, **overrides) == config
    tok_config = TokenizerConfig.from_ddconfig(conf["vae_ddconfig"],
                                               num_codebooks=conf["vae_num_codebooks"])
    tokenizer = Tokenizer(tok_config, port_tokenizer_state_dict(sd, tok_config, prefix="vae."),
                          precision=HIGHEST)
    return config, port_model_state_dict(sd, config), tokenizer


@pytest.mark.parametrize("case_name", AR_CASES)
def test_forward_and_loss(case_name):
    config, params, _ = load_case(case_name)
    a = golden.arrays(case_name)
    latents = golden.nchw_to_nhwc(a["latents"])
    tokens = patching.patchify(latents, config.token_patch)
    golden.check(case_name, "target_tokens", tokens)
    backbone = BitDanceBackbone(config, precision=HIGHEST)
    variables = {"params": params["model"]}
    golden.check(case_name, "layer0_in",
                 backbone.apply(variables, tokens, a["class_ids"], method="embed_sequence"))
    golden.check(case_name, "hidden", backbone.apply(variables, tokens, a["class_ids"]))
    loss = jax.jit(functools.partial(bitdance_loss, config=config, precision=HIGHEST))(
        params, latents, a["class_ids"], t_raw=a["loss_t_raw"], noise=a["loss_e"])
    golden.check(case_name, "loss", loss)


def recorded_noise(a, prefix, config, batch, guided):
    """The run's draws as a table [AR steps, head steps + 1, rows, P, C]. Guided steps
    after the first draw B rows; they fill the conditional half (the rest is unused)."""
    shapes = a[f"{prefix}noise_shapes"]
    per_step = len(shapes) // config.num_steps
    rows = 2 * batch if guided else batch
    table = np.zeros((config.num_steps, per_step, rows, config.parallel_num, config.latent_dim),
                     np.float32)
    for k, shape in enumerate(shapes):
        shape = tuple(int(s) for s in shape if s)
        name = f"{prefix}noise_{k:03d}"
        draw = a[name] if name in a else np.zeros(shape, np.float32)
        assert draw.shape == shape
        draw = draw.reshape(shape[0], config.parallel_num, config.latent_dim)
        table[k // per_step, k % per_step, :shape[0]] = draw
    return table, per_step - 1


def run_prefixes(case_name):
    a = golden.arrays(case_name)
    return sorted({k.split("_")[0] for k in a if k.startswith("sample") and k.endswith("_images")})


@pytest.mark.parametrize("case_name", AR_CASES)
def test_sampling_runs(case_name):
    config, params, tokenizer = load_case(case_name)
    a = golden.arrays(case_name)
    class_ids = a["class_ids"]
    batch = len(class_ids)
    compiled = {}
    for run in run_prefixes(case_name):
        prefix = run + "_"
        cfgs = a[f"{prefix}head_cfg"]
        guided = int(a[f"{prefix}noise_shapes"][0][0]) == 2 * batch   # doubled batch
        # the reference's linear schedule: 1 at step 0 (unguided), then towards cfg_scale
        n = config.num_steps
        cfg_scale = (1 + (cfgs[1] - 1) * n if n > 1 else 2.0) if guided else 1.0
        np.testing.assert_allclose(
            [1 + (cfg_scale - 1) * i / n if guided else 1.0 for i in range(n)], cfgs, rtol=1e-6)
        table, head_steps = recorded_noise(a, prefix, config, batch, guided)
        key = (guided, head_steps)
        if key not in compiled:
            compiled[key] = jax.jit(lambda params, ids, cfg, table, guided=guided, steps=head_steps:
                                    generate(config, params, ids, cfg, lambda i: table[i],
                                             num_sampling_steps=steps, guided=guided,
                                             precision=HIGHEST, record=True))
        tokens, (conds, preds) = compiled[key](params, class_ids, np.float32(cfg_scale), table)
        squeeze = (lambda x: x[:, :, 0]) if config.parallel_num == 1 else (lambda x: x)
        if f"{prefix}head_cond" in a:
            golden.check(case_name, f"{prefix}head_cond", squeeze(conds))
        golden.check(case_name, f"{prefix}head_pred", squeeze(preds))
        grid = patching.unpatchify(np.asarray(tokens), config.token_patch, config.grid_size,
                                   config.grid_size)
        golden.check(case_name, f"{prefix}latent_tokens", np.moveaxis(grid, -1, 1))
        golden.check(case_name, f"{prefix}images", np.moveaxis(tokenizer.decode(grid), -1, 1))


@pytest.mark.slow
def test_training_perturbations():
    """Label dropout sends rows to the null class; bit flips hit each sign with probability
    uniform in [0, rate] (mean rate / 2); both only with an rng, and gradients flow."""
    from bitdance_jax.c2i.loss import flip_bits
    case_name = "ar_parallel"
    config, params, _ = load_case(case_name)
    a = golden.arrays(case_name)
    latents = golden.nchw_to_nhwc(a["latents"])
    loss = jax.jit(functools.partial(bitdance_loss, config=config),
                   static_argnames=("bit_flip_rate", "label_drop"))
    rng = jax.random.key(4)
    dropped = loss(params, latents, a["class_ids"], rng, label_drop=1.0)
    null = loss(params, latents, np.full_like(a["class_ids"], config.num_classes), rng, label_drop=0.0)
    kept = loss(params, latents, a["class_ids"], rng, label_drop=0.0)
    np.testing.assert_allclose(dropped, null, rtol=1e-6)
    assert abs(float(dropped) - float(kept)) > 1e-6
    flipped = loss(params, latents, a["class_ids"], rng, bit_flip_rate=0.5, label_drop=0.0)
    assert abs(float(flipped) - float(kept)) > 1e-6
    signs = jnp.ones((200_000,))
    frac = float(jnp.mean(flip_bits(jax.random.key(0), signs, 0.3) < 0))
    assert abs(frac - 0.15) < 0.005
    grads = jax.jit(jax.grad(lambda p: bitdance_loss(p, latents, a["class_ids"], rng, config=config,
                                                     bit_flip_rate=0.1)))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2

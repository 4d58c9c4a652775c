"""The Euler-Maruyama sampler reproduces the reference's trajectories with recorded draws."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden
from bitdance_jax.porting import convention as porting
from bitdance_jax.nn.diffusion_head import DiffusionNet, HeadConfig
from bitdance_jax.porting.head import port_head_state_dict
from bitdance_jax.nn.flow import euler_maruyama, sampling_times, shift_time

HIGHEST = golden.MATMUL_PRECISION


def _net_fn(config, params):
    net = DiffusionNet(config, precision=HIGHEST)
    return lambda z, t, c: net.apply({"params": params}, z, t, c)


def _imagenet_net():
    cfg = golden.case("sampler")["config"]
    config = HeadConfig.from_reference_kwargs(cfg["diffhead_kwargs"], "imagenet")
    sd = porting.tensors_to_numpy(
        porting.load_torch_file(golden.path("ar_parallel", "checkpoint.pt"))["ema"])
    return _net_fn(config, port_head_state_dict(sd, config, "head.net."))


def _t2i_net():
    with open(golden.path("t2i_model", "vision_head_config.json")) as f:
        config = HeadConfig.from_reference_kwargs(json.load(f), "t2i")
    sd = porting.load_safetensors(golden.path("t2i_model", "vision_head.safetensors"))
    return _net_fn(config, port_head_state_dict(sd, config, "net."))


def _sampler(net_fn, num_steps, shift, last_step_size, guided):
    """One compiled sampler per (steps, shift, guided); cfg_scale stays a traced argument."""
    return jax.jit(lambda cond, noise, cfg: euler_maruyama(
        net_fn, cond, noise, num_steps=num_steps, guided=guided, cfg_scale=cfg, time_shift=shift,
        last_step_size=last_step_size, return_trajectory=True))


def _all_rows(noise, n):
    """Recorded draws cover the state rows only (the first N/2 when guided); zero-pad to the N
    rows we take (whatever N the fixture has)."""
    pad = np.zeros((noise.shape[0], n - noise.shape[1]) + noise.shape[2:], noise.dtype)
    return np.concatenate([noise, pad], axis=1)


def _check_run(case, prefix, sampler, cond, cfg, num_steps, shift, last_step_size):
    a = golden.arrays(case)
    recorded = a[prefix + "noise"]
    out, traj = sampler(cond, _all_rows(recorded, cond.shape[0]), jnp.float32(cfg))
    state_rows = recorded.shape[1]
    golden.check(case, prefix + "trajectory", traj[:, :state_rows])
    golden.check(case, prefix + "out", out[:a[prefix + "out"].shape[0]])
    if cfg > 1:   # guided: both halves carry the same state
        np.testing.assert_array_equal(np.asarray(out[:state_rows]), np.asarray(out[state_rows:]))
    step_t, _, last_t = sampling_times(num_steps, shift, last_step_size)
    np.testing.assert_array_equal(np.append(step_t, last_t), a[prefix + "t_calls"])


def test_imagenet_runs_share_one_compiled_sampler_per_shift_and_guidance():
    case = golden.case("sampler")["config"]
    a = golden.arrays("sampler")
    net_fn = _imagenet_net()
    steps, last = case["num_sampling_steps"], case["last_step_size"]
    samplers = {}
    for run in case["runs"]:
        shift, guided = run["time_shift"], run["cfg"] > 1
        if (shift, guided) not in samplers:
            samplers[shift, guided] = _sampler(net_fn, steps, shift, last, guided)
        cond = np.concatenate([a["c_cond"], a["c_uncond"]]) if guided else a["c_cond"]
        _check_run("sampler", run["prefix"], samplers[shift, guided], cond, run["cfg"], steps,
                   shift, last)


def test_t2i_guided_run():
    case = golden.case("sampler_t2i")["config"]
    a = golden.arrays("sampler_t2i")
    steps, shift = case["num_sampling_steps"], case["time_shift"]
    last = case.get("last_step_size", 0.05)
    sampler = _sampler(_t2i_net(), steps, shift, last, case["cfg"] > 1)
    _check_run("sampler_t2i", "", sampler, a["c"], case["cfg"], steps, shift, last)


def test_guidance_decided_statically_with_a_traced_cfg_inside_a_loop():
    """As the AR sampler does: one program samples an unguided step on all rows, then guided
    steps whose cfg is a traced loop value."""
    case = golden.case("sampler")["config"]
    a = golden.arrays("sampler")
    net_fn = _imagenet_net()
    steps, last = case["num_sampling_steps"], case["last_step_size"]
    runs = {r["cfg"] > 1: r for r in case["runs"] if r["time_shift"] == case["runs"][0]["time_shift"]}
    assert set(runs) == {False, True}, "the sampler fixture needs a guided and an unguided run with one shift"
    unguided, guided = runs[False], runs[True]
    cond = np.concatenate([a["c_cond"], a["c_uncond"]])
    half = a["c_cond"].shape[0]
    # Unguided, every row evolves on its own: rows [:half] replay the unguided run (cond rows).
    unguided_noise = _all_rows(a[unguided["prefix"] + "noise"], 2 * half)
    guided_noise = _all_rows(a[guided["prefix"] + "noise"], 2 * half)
    cfgs = jnp.asarray([guided["cfg"]] * 2, jnp.float32)

    def run():
        first = euler_maruyama(net_fn, cond, unguided_noise, num_steps=steps, guided=False,
                               time_shift=guided["time_shift"], last_step_size=last)

        def body(i, out):
            return euler_maruyama(net_fn, cond, guided_noise, num_steps=steps, guided=True,
                                  cfg_scale=cfgs[i], time_shift=guided["time_shift"],
                                  last_step_size=last)
        return first, jax.lax.fori_loop(0, 2, body, jnp.zeros_like(first))

    first, later = jax.jit(run)()
    golden.check("sampler", unguided["prefix"] + "out", first[:half])
    golden.check("sampler", guided["prefix"] + "out", later)


def test_time_shift_edges():
    grid = np.array([0.0, 0.5, 1.0], np.float32)
    with np.errstate(divide="ignore"):
        shifted = shift_time(grid, 3.0)
    np.testing.assert_allclose(shifted, [0.0, 0.25, 1.0], rtol=1e-6)
    step_t, dt, last_t = sampling_times(4, 1.0)
    assert step_t[0] == 0 and last_t == np.float32(0.95)
    np.testing.assert_allclose(step_t[-1] + dt[-1], 0.95, rtol=1e-6)


def test_bad_sampler_inputs_raise():
    net_fn = lambda z, t, c: z
    cond = jnp.zeros((3, 2, 4))
    with pytest.raises(ValueError, match="noise"):
        euler_maruyama(net_fn, cond, jnp.zeros((2, 3, 2, 4)), num_steps=2, guided=False,
                       time_shift=1.0)
    # Guided needs an even number of rows, whether cfg is concrete or traced; unguided, odd
    # rows take a traced cfg too (it was refused when guidance was read off the cfg value).
    with pytest.raises(ValueError, match="classifier-free guidance needs an even number of rows, got 3"):
        euler_maruyama(net_fn, cond, jnp.zeros((3, 3, 2, 4)), num_steps=2, guided=True,
                       cfg_scale=2.0, time_shift=1.0)
    with pytest.raises(ValueError, match="even number of rows, got 3"):
        jax.jit(lambda c: euler_maruyama(net_fn, cond, jnp.zeros((3, 3, 2, 4)), num_steps=2,
                                         guided=True, cfg_scale=c, time_shift=1.0))(2.0)
    out = jax.jit(lambda c: euler_maruyama(net_fn, cond, jnp.ones((3, 3, 2, 4)), num_steps=2,
                                           guided=False, cfg_scale=c, time_shift=1.0))(2.0)
    assert out.shape == cond.shape and bool(jnp.isfinite(out).all())

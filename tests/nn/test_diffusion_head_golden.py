"""The ported diffusion heads and the flow-matching loss reproduce the reference heads."""
import json
import re

import jax
import numpy as np
import pytest

import golden
from flax import linen as nn

from bitdance_jax.porting import convention as porting
from bitdance_jax.nn.diffusion_head import DiffusionNet, HeadConfig, abstract_head_params
from bitdance_jax.porting.head import infer_head_config, port_head_state_dict
from bitdance_jax.nn.flow import flow_matching_loss
from bitdance_jax.parallel.sharding import logical_sharding, make_mesh

# ImageNet head case -> folder of the AR checkpoint whose 'ema' holds its weights.
IMAGENET_WEIGHTS = {"head_imagenet_parallel": "ar_parallel", "head_imagenet_1x": "ar_1x"}
_BLOCK_MLP = re.compile(r"^net\.res_blocks\.\d+\.(w1|w2|mlp\.\d+)\.")


def _imagenet_ema(ckpt_dir):
    ckpt = porting.load_torch_file(golden.path(ckpt_dir, "checkpoint.pt"))
    return porting.tensors_to_numpy(ckpt["ema"])


def _t2i_weights(case_name):
    sd = porting.load_safetensors(golden.path("t2i_model", "vision_head.safetensors"))
    if case_name == "head_t2i_alt":
        alt = porting.load_safetensors(golden.path("heads", "t2i_head_alt_mlp.safetensors"))
        sd = {k: v for k, v in sd.items() if not _BLOCK_MLP.match(k)}
        sd.update(alt)
    return sd


def load_head(case_name):
    """(config, params, prefix-stripped torch state_dict) of a golden head case."""
    kwargs = golden.case(case_name)["config"]["diffhead_kwargs"]
    if case_name in IMAGENET_WEIGHTS:
        config = HeadConfig.from_reference_kwargs(kwargs, "imagenet")
        sd, prefix = _imagenet_ema(IMAGENET_WEIGHTS[case_name]), "head.net."
    else:
        config = HeadConfig.from_reference_kwargs(kwargs, "t2i")
        sd, prefix = _t2i_weights(case_name), "net."
    return config, port_head_state_dict(sd, config, prefix), sd, prefix


HIGHEST = golden.MATMUL_PRECISION
HEAD_CASES = ["head_imagenet_parallel", "head_imagenet_1x", "head_t2i", "head_t2i_alt"]


@pytest.fixture(scope="module", params=HEAD_CASES)
def head(request):
    return (request.param,) + load_head(request.param)


def test_net_and_loss(head):
    name, config, params, _, _ = head
    a = golden.arrays(name)
    net = DiffusionNet(config, precision=HIGHEST)
    net_fn = jax.jit(lambda z, t, c: net.apply({"params": params}, z, t, c))
    golden.check(name, "net_out", net_fn(a["x"], a["t"], a["c"]))
    if "x_long" in a:
        golden.check(name, "net_out_long", net_fn(a["x_long"], a["t_long"], a["c_long"]))
    reduce = "channels" if config.variant == "t2i" else "mean"
    shifts = {"loss": config.time_shift,
              "loss_time_shift_alt": golden.case(name)["config"]["loss_time_shift_alt"]}
    for array, shift in shifts.items():
        loss = flow_matching_loss(net_fn, a["target"], a["c"], a["loss_t_raw"], a["loss_e"],
                                  P_mean=config.P_mean, P_std=config.P_std, time_shift=shift,
                                  reduce=reduce)
        golden.check(name, array, loss)


def test_config_roundtrip_and_inference(head):
    name, config, _, sd, prefix = head
    assert HeadConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    schedule = dict(parallel_num=config.parallel_num, time_shift=config.time_shift,
                    P_mean=config.P_mean, P_std=config.P_std, diff_batch_mul=config.diff_batch_mul)
    assert infer_head_config(sd, config.variant, prefix, **schedule) == config


def test_t2i_config_files_match_cases():
    for case_name, config_file in [("head_t2i", ("t2i_model", "vision_head_config.json")),
                                   ("head_t2i_alt", ("heads", "t2i_head_alt_mlp_config.json"))]:
        with open(golden.path(*config_file)) as f:
            from_file = HeadConfig.from_reference_kwargs(json.load(f), "t2i")
        kwargs = golden.case(case_name)["config"]["diffhead_kwargs"]
        assert from_file == HeadConfig.from_reference_kwargs(kwargs, "t2i")


def test_porting_is_strict(head):
    _, config, _, sd, prefix = head
    head_keys = sorted(k for k in sd if k.startswith(prefix))
    missing = {k: v for k, v in sd.items() if k != head_keys[0]}
    with pytest.raises(porting.PortingError, match="missing"):
        port_head_state_dict(missing, config, prefix)
    extra = dict(sd, **{prefix + "res_blocks.99.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(porting.PortingError, match="unexpected"):
        port_head_state_dict(extra, config, prefix)
    wrong = dict(sd, **{head_keys[0]: np.zeros((1,) + sd[head_keys[0]].shape, np.float32)})
    with pytest.raises(porting.PortingError, match="shape"):
        port_head_state_dict(wrong, config, prefix)


def test_bad_inputs_raise():
    config, params, _, _ = load_head("head_imagenet_parallel")
    a = golden.arrays("head_imagenet_parallel")
    net = DiffusionNet(config)
    with pytest.raises(ValueError):
        net.apply({"params": params}, a["x"][:, 0], a["t"], a["c"][:, 0])
    with pytest.raises(ValueError):
        net.apply({"params": params}, a["x"], a["t"][:1], a["c"])
    with pytest.raises(ValueError):
        HeadConfig.from_reference_kwargs(dict(golden.case("head_imagenet_parallel")["config"]
                                              ["diffhead_kwargs"], time_schedule="uniform"),
                                         "imagenet")


def _formats(model):
    with open(golden.path("checkpoint_formats.json")) as f:
        return json.load(f)["models"][model]


def _released(model):
    return {k: tuple(s) for k, s, _ in _formats(model)["state_dict"]}


@pytest.mark.parametrize("model", [f"BitDance-{size}-{p}x" for size in "BLH" for p in (1, 4, 16)])
def test_released_imagenet_head_layout(model):
    released = {k: s for k, s in _released(model).items() if k.startswith("head.")}
    parallel_num = 1 if model.endswith("-1x") else int(model.rsplit("-", 1)[1][:-1])
    config = infer_head_config(released, "imagenet", "head.net.", parallel_num=parallel_num)
    assert config.uses_mlp_encoder == (parallel_num == 1)
    ours = {"head.net." + k: s
            for k, s in porting.expected_torch_shapes(abstract_head_params(config)).items()}
    assert ours == released


@pytest.mark.parametrize("model", ["BitDance-14B-16x/vision_head", "BitDance-14B-64x/vision_head"])
def test_released_t2i_head_layout(model):
    config = HeadConfig.from_reference_kwargs(_formats(model)["vision_head_config"], "t2i")
    ours = {"net." + k: s
            for k, s in porting.expected_torch_shapes(abstract_head_params(config)).items()}
    assert ours == _released(model)


@pytest.mark.parametrize("case_name", HEAD_CASES)
def test_every_param_has_logical_axes_and_shards_on_a_mesh(case_name):
    config = HeadConfig.from_reference_kwargs(
        golden.case(case_name)["config"]["diffhead_kwargs"],
        "imagenet" if case_name in IMAGENET_WEIGHTS else "t2i")
    abstract = abstract_head_params(config)
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    shardings = jax.tree.leaves(logical_sharding(abstract, make_mesh((2, 2, 2))))
    assert len(shardings) == len(leaves)

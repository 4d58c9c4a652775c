"""A fresh init has the reference's statistics, group by group (c2i 4x and 1x, T2I).

Reference: every Linear N(0, 0.02) with zero bias and every embedding N(0, 0.02)
(imagenet_gen/src/model.py, model_parallel.py, and Hugging Face's Qwen3); the diffusion head
re-initialised after that: Xavier-uniform linears with zero bias, the timestep MLP N(0, 0.02),
every adaLN modulation and the final layer zero (diff_head*.py, flow_head_parallel_x.py); the
T2I projector left at PyTorch's default (U(+-1/sqrt(fan_in)) kernel and bias).

``pytest -s`` prints the table (group, count, expected, measured).
"""
import math

import jax
import numpy as np
import pytest
from flax import linen as nn

from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.model import init_params
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i.config import T2IConfig
from bitdance_jax.t2i.loss import PackedT2IModel
from bitdance_jax.tokenizer.model import TokenizerConfig

STD = 0.02
C2I_4X = BitDanceConfig(dim=128, n_layer=2, n_head=4, diff_layers=2, diff_dim=128,
                        diff_adanln_layers=2, latent_dim=16, grid_size=8, cls_token_num=4,
                        num_classes=10, parallel_num=4)
C2I_1X = BitDanceConfig(dim=128, n_layer=2, n_head=4, diff_layers=2, diff_dim=128,
                        diff_adanln_layers=1, latent_dim=16, grid_size=8, cls_token_num=4,
                        num_classes=10, parallel_num=1)
T2I = T2IConfig(
    llm=qwen3.Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32),
    head_kwargs=dict(ch_target=16, ch_cond=128, ch_latent=256, depth_latent=2, depth_adanln=1,
                     parallel_num=4, use_swiglu=False),
    tokenizer=TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16,
                              num_codebooks=2))
TABLE = []


def leaves(tree):
    """{'a/b/kernel': array} of a param tree."""
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def std_tolerance(n: int) -> float:
    """Relative tolerance of a sample std of n draws: 6 standard errors (1/sqrt(2n))."""
    return 6.0 / math.sqrt(2 * n)


class Groups:
    def __init__(self, model: str, params: dict):
        self.model, self.params, self.seen = model, params, set()

    def take(self, match):
        keys = [k for k in self.params if match(k) and k not in self.seen]
        assert keys, "empty group"
        self.seen.update(keys)
        return keys

    def record(self, group, keys, expected, measured):
        n = sum(self.params[k].size for k in keys)
        TABLE.append((self.model, group, len(keys), n, expected, measured))

    def normal(self, group, match, std=STD):
        """Pooled std and mean of the group, and each tensor's std on its own."""
        keys = self.take(match)
        values = np.concatenate([self.params[k].ravel() for k in keys])
        measured = float(values.std())
        each = [float(self.params[k].std()) for k in keys]
        self.record(group, keys, f"N(0, {std})", f"std {measured:.5f} (per tensor "
                    f"{min(each):.4f}..{max(each):.4f}), mean {values.mean():+.1e}")
        assert abs(measured / std - 1) < std_tolerance(values.size), (group, measured)
        assert abs(values.mean()) < 6 * std / math.sqrt(values.size), group
        for k, s in zip(keys, each):
            assert abs(s / std - 1) < std_tolerance(self.params[k].size), (k, s)

    def constant(self, group, match, value):
        keys = self.take(match)
        worst = max(float(np.abs(self.params[k] - value).max()) for k in keys)
        self.record(group, keys, f"all {value}", f"max |x - {value}| {worst:.1e}")
        assert worst == 0, group

    def uniform(self, group, match, bound_of):
        """Each kernel U(-b, b) with its own b = bound_of(kernel): |w| <= b, std b/sqrt(3)."""
        keys = self.take(match)
        ratios, worst = [], 0.0
        for k in keys:
            w = self.params[k]
            b = bound_of(w)
            worst = max(worst, float(np.abs(w).max() / b))
            ratios.append(float(w.std() / (b / math.sqrt(3))))
            assert np.abs(w).max() <= b, k
            assert abs(ratios[-1] - 1) < std_tolerance(w.size), (k, ratios[-1])
        self.record(group, keys, "U(-b, b)", f"max|w|/b {worst:.3f}, std/(b/sqrt3) "
                    f"{min(ratios):.3f}..{max(ratios):.3f}")

    def done(self):
        rest = sorted(set(self.params) - self.seen)
        assert not rest, f"params in no group: {rest}"


def xavier_bound(w):
    fan_in, fan_out = w.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def torch_default_bound(fan_in):
    return lambda w: 1.0 / math.sqrt(fan_in)


def check_head(g: Groups, prefix: str):
    h = lambda *names: (lambda k: k.startswith(prefix) and any(n in k for n in names))
    g.constant("head adaLN modulations (kernel, bias)", h("ada_ln_blocks_", "ada_ln_modulation"), 0.0)
    g.constant("head final linear (kernel, bias)", h("final_layer/linear/"), 0.0)
    g.normal("head timestep MLP kernels", lambda k: k.startswith(prefix + "time_embed/")
             and k.endswith("kernel"))
    g.uniform("head Linear kernels (Xavier)", lambda k: k.startswith(prefix)
              and k.endswith("kernel"), xavier_bound)
    g.constant("head Linear biases", lambda k: k.startswith(prefix) and k.endswith("bias")
               and "/norm" not in k, 0.0)
    g.constant("head LayerNorm scales", lambda k: k.startswith(prefix) and k.endswith("scale"), 1.0)
    g.constant("head LayerNorm biases", lambda k: k.startswith(prefix) and "/norm" in k, 0.0)


@pytest.mark.parametrize("config", [C2I_4X, C2I_1X], ids=["c2i_4x", "c2i_1x"])
def test_c2i_init_matches_the_reference(config):
    params = leaves(init_params(config, jax.random.PRNGKey(0)))
    g = Groups(f"c2i {config.parallel_num}x", params)
    m = lambda *names: (lambda k: k.startswith("model/") and any(n in k for n in names))
    g.normal("backbone Linear kernels", lambda k: k.startswith("model/") and k.endswith("kernel"))
    g.constant("backbone Linear biases", lambda k: k.startswith("model/") and k.endswith("bias"), 0.0)
    g.normal("embeddings (class, pos_for_diff)", m("embedding"))
    if config.parallel_num > 1:
        g.normal("query tokens", m("query_token"))
    g.constant("RMSNorm scales", lambda k: k.startswith("model/") and k.endswith("scale"), 1.0)
    check_head(g, "head/")
    g.done()


def test_t2i_init_matches_the_reference():
    model = PackedT2IModel(T2I)
    params = leaves(model.init(jax.random.PRNGKey(0)))
    g = Groups("t2i", params)
    g.normal("Qwen3 Linear kernels (incl. lm_head)", lambda k: k.startswith("llm/")
             and k.endswith("kernel"))
    g.normal("Qwen3 token embeddings", lambda k: k.startswith("llm/") and k.endswith("embedding"))
    g.constant("Qwen3 RMSNorm scales", lambda k: k.startswith("llm/") and k.endswith("scale"), 1.0)
    z, hidden = T2I.tokenizer.z_channels, T2I.llm.hidden_size
    for name, fan_in in (("fc1", z), ("fc2", hidden)):
        g.uniform(f"projector {name} kernel+bias (PyTorch default)",
                  lambda k, n=name: k.startswith(f"projector/{n}/"),
                  torch_default_bound(fan_in))
    check_head(g, "head/")
    g.done()


def test_zz_print_init_table():
    """Runs last in this file: the table of every group checked above (``pytest -s``)."""
    assert TABLE
    width = max(len(r[1]) for r in TABLE)
    print(f"\n{'model':8} {'group':{width}} {'tensors':>7} {'values':>8}  expected -> measured")
    for model, group, tensors, n, expected, measured in TABLE:
        print(f"{model:8} {group:{width}} {tensors:7d} {n:8d}  {expected} -> {measured}")

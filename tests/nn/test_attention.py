"""The attention helper: every implementation available here against the plain einsum path
and a float64 reference, values and gradients, on the c2i block-causal mask (full sequence
and a KV-cache step), the packed-segment T2I mask (grouped queries, padding rows with no
visible key), a per-head rank-4 mask and no mask; the XLA path's chunked CPU loop and its
residuals under the ``dots`` remat policy.

``pytest -s`` prints each option's max error.
"""
import io
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitdance_jax.c2i.config import REMAT_POLICIES, BitDanceConfig
from bitdance_jax.c2i.model import BitDanceBackbone, block_causal_mask, init_params
from bitdance_jax.nn import attention as attn
from bitdance_jax.t2i.loss import packed_attention_mask

ERRORS = []


def available():
    """Implementations to compare with ``einsum`` on this backend (``auto`` is one of them,
    see test_auto_choice_and_bad_options)."""
    impls = ["xla"]
    if jax.default_backend() == "gpu":
        impls.append("cudnn")
    return impls


def _reference_weights(q, k, mask):
    """float64 softmax weights [B, N, T, S] over the allowed keys only (rows without one:
    uniform), the [B, N, T, S] mask and the kv heads repeated per query head."""
    q, k = (np.asarray(a, np.float64) for a in (q, k))
    b, t, n, h = q.shape
    k = np.repeat(k, n // k.shape[2], axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    if mask is None:
        mask = np.ones(logits.shape, bool)
    mask = np.asarray(mask)
    mask = np.broadcast_to(mask.reshape((-1, 1) + mask.shape[-2:]) if mask.ndim == 3 else mask,
                           logits.shape)
    logits = np.where(mask, logits, -np.inf)
    empty = ~mask.any(-1, keepdims=True)
    logits = np.where(empty, 0.0, logits)            # no visible key: uniform weights
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True), mask, empty, k


def reference(q, k, v, mask):
    """float64 softmax attention over the allowed keys only (rows without one: mean of v)."""
    w, _, _, _ = _reference_weights(q, k, mask)
    v = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bnts,bsnh->btnh", w, v)


def reference_grads(q, k, v, mask, d_out):
    """float64 gradients of sum(attention(q, k, v) * d_out) w.r.t. q, k, v (hidden keys and
    rows with no visible key pass no gradient to the logits)."""
    w, mask, empty, k_rep = _reference_weights(q, k, mask)
    b, t, n, h = q.shape
    g = n // k.shape[2]
    v_rep = np.repeat(np.asarray(v, np.float64), g, axis=2)
    d_out = np.asarray(d_out, np.float64)
    d_v = np.einsum("bnts,btnh->bsnh", w, d_out)
    d_w = np.einsum("btnh,bsnh->bnts", d_out, v_rep)
    d_logits = w * (d_w - (w * d_w).sum(-1, keepdims=True)) / np.sqrt(h)
    d_logits = np.where(mask & ~empty, d_logits, 0.0)
    d_q = np.einsum("bnts,bsnh->btnh", d_logits, k_rep)
    d_k = np.einsum("bnts,btnh->bsnh", d_logits, np.asarray(q, np.float64))
    group_sum = lambda a: a.reshape(a.shape[:2] + (n // g, g, h)).sum(3)
    return d_q, group_sum(d_k), group_sum(d_v)


def qkv(shape_q, shape_kv, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_q).astype(np.float32)
    k = rng.standard_normal(shape_kv).astype(np.float32)
    v = rng.standard_normal(shape_kv).astype(np.float32)
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def c2i_case():
    cls, p, n_tokens = 3, 4, 16
    seq = cls + n_tokens - 1
    mask = block_causal_mask(seq, cls, p)
    return (*qkv((2, seq, 4, 16), (2, seq, 4, 16)), mask)


def c2i_step_case():
    """AR step: P query rows at slot ``start`` over a partly written cache."""
    cls, p, n_tokens = 3, 4, 16
    seq = cls + n_tokens - 1
    start = cls + p - 1 + p   # the second fed-back block
    mask = block_causal_mask(seq, cls, p)[start:start + p]
    q, k, v = qkv((2, p, 4, 16), (2, seq, 4, 16), seed=1)
    return q, k, v, mask


def packed_case():
    """Two samples and padding per row; grouped queries (4 heads over 2 kv heads)."""
    seg = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0],
                    [1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 0]], np.int32)
    blocks = np.array([[0, 1, 2, 2, 3, 3, 0, 1, 1, 2, 2, 0],
                       [0, 1, 1, 0, 1, 2, 2, 3, 3, 0, 0, 0]], np.int32)
    visible = np.ones_like(seg, bool)
    visible[0, 1] = False                                    # a dropped caption token
    mask = np.asarray(packed_attention_mask(jnp.asarray(seg), jnp.asarray(blocks),
                                            jnp.asarray(visible)))
    assert (~mask.any(-1)).any()                             # padding rows see nothing
    return (*qkv((2, 12, 4, 8), (2, 12, 2, 8), seed=2), mask)


def per_head_case():
    """A rank-4 mask that differs per batch row and query head (4 heads over 2 kv heads), one
    row of one head with no visible key."""
    rng = np.random.default_rng(3)
    mask = rng.random((2, 4, 6, 9)) < 0.5
    mask[1, 2, 3] = False
    return (*qkv((2, 6, 4, 8), (2, 9, 2, 8), seed=3), mask)


def unmasked_case():
    """No mask (the diffusion head)."""
    return (*qkv((3, 5, 2, 8), (3, 5, 2, 8), seed=4), None)


CASES = {"c2i block-causal": c2i_case, "c2i KV-cache step": c2i_step_case,
         "t2i packed segments": packed_case, "per-head rank-4": per_head_case,
         "no mask": unmasked_case}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", available())
def test_implementation_matches_einsum_and_float64(case, impl):
    q, k, v, mask = CASES[case]()
    plain = np.asarray(attn.attention(q, k, v, mask, implementation="einsum"))
    got = np.asarray(jax.jit(lambda q, k, v: attn.attention(q, k, v, mask, implementation=impl))(
        q, k, v))
    want = reference(q, k, v, mask)
    assert np.isfinite(got).all() and np.isfinite(plain).all()
    err_plain = float(np.abs(got - plain).max())
    err_ref = float(np.abs(got - want).max())
    err_plain_ref = float(np.abs(plain - want).max())
    ERRORS.extend([("einsum", case, "float32", 0.0, err_plain_ref),
                   (impl, case, "float32", err_plain, err_ref)])
    assert err_plain < 2e-6 and err_ref < 5e-6, (err_plain, err_ref)
    assert err_plain_ref < 5e-6


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", available())
def test_bfloat16_inputs_keep_float32_logits(case, impl):
    """bf16 q/k/v: the same result as the einsum path (float32 logits and softmax), and
    within bf16 rounding of the float64 reference."""
    q, k, v, mask = CASES[case]()
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    plain = np.asarray(attn.attention(q, k, v, mask, implementation="einsum"), np.float32)
    got = np.asarray(jax.jit(lambda q, k, v: attn.attention(q, k, v, mask, implementation=impl))(
        q, k, v), np.float32)
    want = reference(np.asarray(q, np.float32), np.asarray(k, np.float32),
                     np.asarray(v, np.float32), mask)
    err_plain = float(np.abs(got - plain).max())
    err_ref = float(np.abs(got - want).max())
    ERRORS.extend([("einsum", case, "bfloat16", 0.0, float(np.abs(plain - want).max())),
                   (impl, case, "bfloat16", err_plain, err_ref)])
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # one bf16 rounding step of the output apart (xla normalises the float32 output, einsum
    # rounds the weights to bf16 first), and both close to float64
    np.testing.assert_array_less(np.abs(got - plain), 2 ** -7 * np.maximum(np.abs(plain), 1)
                                 + 1e-9)
    assert err_ref < 3e-2, err_ref


def test_fully_masked_rows_are_finite_and_uniform():
    q, k, v = qkv((1, 3, 2, 8), (1, 5, 2, 8))
    mask = np.zeros((3, 5), bool)
    mask[0, :2] = True
    for impl in ["einsum"] + available():
        out = np.asarray(attn.attention(q, k, v, mask, implementation=impl))
        assert np.isfinite(out).all(), impl
        np.testing.assert_allclose(out[0, 1:], np.broadcast_to(np.asarray(v).mean(1), (2, 2, 8)),
                                   atol=1e-6)


def grads(impl, q, k, v, mask, d_out):
    f = lambda q, k, v: attn.attention(q, k, v, mask, implementation=impl)
    return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](d_out))(q, k, v)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", available())
def test_gradients_match_einsum_and_float64(case, impl):
    q, k, v, mask = CASES[case]()
    d_out = qkv(q.shape, q.shape, seed=9)[0]
    want = reference_grads(q, k, v, mask, d_out)
    plain = grads("einsum", q, k, v, mask, d_out)
    for name, got, ref, p in zip("qkv", grads(impl, q, k, v, mask, d_out), want, plain):
        got, p = np.asarray(got), np.asarray(p)
        assert np.isfinite(got).all(), name
        scale = float(np.abs(ref).max())
        err_plain, err_ref = float(np.abs(got - p).max()), float(np.abs(got - ref).max())
        ERRORS.append((impl, f"{case} d{name}", "float32", err_plain, err_ref))
        assert err_plain < 1e-5 * scale and err_ref < 1e-5 * scale, (name, err_plain, err_ref)


@pytest.mark.parametrize("case", ["c2i block-causal", "t2i packed segments"])
@pytest.mark.parametrize("impl", available())
def test_bfloat16_gradients(case, impl):
    """bf16 q/k/v: gradients within bf16 rounding of float64 (relative to their scale)."""
    q, k, v, mask = CASES[case]()
    d_out = qkv(q.shape, q.shape, seed=9)[0]
    want = reference_grads(q, k, v, mask, d_out)
    bf16 = lambda a: a.astype(jnp.bfloat16)
    got = grads(impl, bf16(q), bf16(k), bf16(v), mask, bf16(d_out))
    for name, g, ref in zip("qkv", got, want):
        assert g.dtype == jnp.bfloat16, name
        err = float(np.abs(np.asarray(g, np.float32) - ref).max()) / float(np.abs(ref).max())
        ERRORS.append((impl, f"{case} d{name}", "bfloat16", float("nan"), err))
        assert err < 3e-2, (name, err)


@pytest.mark.parametrize("case", ["t2i packed segments", "per-head rank-4"])
def test_xla_cpu_loop_chunks(case, monkeypatch):
    """The XLA path's CPU loop over (batch row, kv head) units in chunks of one unit and in
    chunks of three (4 units: a remainder): the same values and gradients as one chunk."""
    if jax.default_backend() != "cpu":
        pytest.skip("the chunked loop is the CPU path")
    q, k, v, mask = CASES[case]()
    d_out = qkv(q.shape, q.shape, seed=9)[0]
    run = lambda: (np.asarray(attn.attention(q, k, v, mask, implementation="xla")),
                   *map(np.asarray, grads("xla", q, k, v, mask, d_out)))
    whole = run()
    unit_bytes = 4 * (q.shape[2] // k.shape[2]) * q.shape[1] * k.shape[1]
    for units_per_chunk in (1, 3):
        monkeypatch.setattr(attn, "CPU_CHUNK_BYTES", units_per_chunk * unit_bytes)
        for a, b in zip(run(), whole):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_dots_policy_keeps_the_attention_residuals():
    """Under remat with the ``dots`` policy the XLA path's output and log-sum-exp are saved
    (not recomputed by running the attention forward again in the backward pass)."""
    q, k, v, mask = c2i_case()
    f = jax.checkpoint(lambda q, k, v: jnp.sum(attn.attention(q, k, v, mask,
                                                              implementation="xla")),
                       policy=REMAT_POLICIES["dots"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(f, q, k, v)
    for name in attn.RESIDUAL_NAMES:
        assert f"named '{name}'" in printed.getvalue(), printed.getvalue()
    want = jax.grad(lambda *a: jnp.sum(attn.attention(*a, mask, implementation="einsum")),
                    argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v), want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_auto_choice_and_bad_options():
    q, k, v = qkv((1, 4, 2, 8), (1, 4, 2, 8))
    expected = "cudnn" if attn.cudnn_supported(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                v.astype(jnp.bfloat16)) else "xla"
    assert attn.resolve_implementation("auto", q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                       v.astype(jnp.bfloat16)) == expected
    assert attn.resolve_implementation("auto", q, k, v) == "xla"   # float32: never cuDNN
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attn.attention(q, k, v, implementation="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
            attn.attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="boolean"):
        attn.attention(q, k, v, np.ones((4, 4), np.float32))


def test_backbone_is_the_same_with_every_implementation():
    config = BitDanceConfig(dim=64, n_layer=2, n_head=4, diff_layers=1, diff_dim=64,
                            diff_adanln_layers=1, latent_dim=8, grid_size=4, cls_token_num=3,
                            num_classes=10, parallel_num=4)
    params = init_params(config, jax.random.PRNGKey(0))["model"]
    tokens = jnp.sign(jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8)))
    ids = jnp.array([1, 10])
    run = lambda impl: np.asarray(jax.jit(BitDanceBackbone(config, attention_impl=impl).apply)(
        {"params": params}, tokens, ids))
    plain = run("einsum")
    for impl in available():
        err = float(np.abs(run(impl) - plain).max())
        ERRORS.append((impl, "c2i backbone forward", "float32", err, float("nan")))
        assert err < 1e-5


def test_zz_print_errors():
    """Runs last in this file (``pytest -s``): max |option - einsum| and |option - float64|."""
    assert ERRORS
    print(f"\n{'impl':6} {'case':26} {'inputs':8} {'max|x - einsum|':>16} {'max|x - f64|':>13}")
    for impl, case, dtype, e_plain, e_ref in ERRORS:
        print(f"{impl:6} {case:26} {dtype:8} {e_plain:16.2e} {e_ref:13.2e}")

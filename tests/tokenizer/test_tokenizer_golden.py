"""The ported tokenizer reproduces the reference on every golden tokenizer case."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import golden
from bitdance_jax.porting import convention as porting
from bitdance_jax.tokenizer.model import (TokenizerConfig, bits_to_indices, quantize_signs,
                                    quantizer_losses, straight_through)
from bitdance_jax.tokenizer.api import Tokenizer
from bitdance_jax.porting.tokenizer import infer_tokenizer_config, port_tokenizer_state_dict


def _tokenizer_from(state_dict, case_name):
    cfg = golden.case(case_name)["config"]
    config = TokenizerConfig.from_ddconfig(cfg["ddconfig"], num_codebooks=cfg["num_codebooks"],
                                           gan_decoder=cfg.get("gan_decoder", False))
    assert infer_tokenizer_config(state_dict, num_codebooks=cfg["num_codebooks"]) == config
    return Tokenizer(config, port_tokenizer_state_dict(state_dict, config),
                     precision=golden.MATMUL_PRECISION)


@pytest.fixture(scope="module", params=["pt", "safetensors"])
def tokenizer(request):
    if request.param == "pt":
        sd = porting.tensors_to_numpy(porting.load_torch_file(golden.path("tokenizer", "ae.pt"))["state_dict"])
    else:
        sd = porting.load_safetensors(golden.path("t2i_model", "ae.safetensors"))
    return _tokenizer_from(sd, "tokenizer")


def test_encode_quantize_decode(tokenizer):
    a = golden.arrays("tokenizer")
    images = golden.nchw_to_nhwc(a["images"])
    h = tokenizer.encode_pre_quant(images)
    golden.check("tokenizer", "h", np.moveaxis(h, -1, 1))
    bits, idx = tokenizer.encode_indices(images)
    golden.check("tokenizer", "quant", np.moveaxis(bits, -1, 1))
    # Golden indices: (num_codebooks, B*h*w), flattened b, y, x.
    golden.check("tokenizer", "indices", idx.reshape(-1, idx.shape[-1]).T)
    golden.check("tokenizer", "dec", np.moveaxis(tokenizer.decode(bits), -1, 1))


@pytest.mark.parametrize("which", ["small", "unit"])
def test_quantizer_training_losses(which):
    a = golden.arrays("tokenizer")
    num_codebooks = golden.case("tokenizer")["config"]["num_codebooks"]
    x = golden.nchw_to_nhwc(a[f"gfq_train_in_{which}"])
    losses = quantizer_losses(jnp.asarray(x), num_codebooks, precision=golden.MATMUL_PRECISION)
    golden.check("tokenizer", f"train_{which}_per_sample_entropy", losses.per_sample_entropy)
    golden.check("tokenizer", f"train_{which}_codebook_entropy", losses.codebook_entropy)
    golden.check("tokenizer", f"train_{which}_entropy_aux_loss", losses.entropy_aux_loss)
    # Intended commitment loss (the reference's own value is bug 2 of the golden README).
    golden.check("tokenizer", f"train_{which}_commit_full_mean", losses.commitment)
    st = straight_through(jnp.asarray(x))
    golden.check("tokenizer", f"train_{which}_quant_st", np.moveaxis(np.asarray(st), -1, 1))


def test_gan_decoder():
    a = golden.arrays("gan_decoder")
    sd = porting.load_safetensors(golden.path("gan_decoder", "ae.safetensors"))
    with open(golden.path("gan_decoder", "ae_config.json")) as f:
        assert json.load(f)["gan_decoder"] is True
    tok = _tokenizer_from(sd, "gan_decoder")
    bits = tok.encode(golden.nchw_to_nhwc(a["images"]))
    golden.check("gan_decoder", "quant", np.moveaxis(bits, -1, 1))
    dec = tok.decode(bits, noise=golden.nchw_to_nhwc(a["noise"]))
    golden.check("gan_decoder", "dec", np.moveaxis(dec, -1, 1))


def test_index_bit_order_and_sign_of_zero():
    bits = jnp.array([[1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    np.testing.assert_array_equal(bits_to_indices(bits, 2), [[1 + 4 + 8, 8]])
    np.testing.assert_array_equal(quantize_signs(jnp.array([0.0, -0.0, 1e-9, -1e-9])),
                                  [-1, -1, 1, -1])

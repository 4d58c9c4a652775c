"""Qwen3 backbone: golden hidden states, KV-cache decoding, 14B shapes, logical axes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

import golden
from bitdance_jax.porting import convention as porting
from bitdance_jax.t2i import qwen3


@pytest.fixture(scope="module")
def golden_llm():
    model_dir = golden.path(golden.case("t2i_parts")["config"]["model_dir"])
    config = qwen3.Qwen3Config.from_json(model_dir)
    state_dict = porting.load_safetensors(golden.path(model_dir, "model.safetensors"))
    params = porting.convert_state_dict(state_dict, qwen3.abstract_qwen3_params(config))
    return config, params


def test_golden_hidden_states_and_logits(golden_llm):
    config, params = golden_llm
    ids = jnp.asarray(golden.arrays("t2i_parts")["llm_input_ids"])
    logits, out = qwen3.Qwen3ForCausalLM(config).apply({"params": params}, ids,
                                                       output_hidden_states=True)
    golden.check("t2i_parts", "llm_embeds", out.hidden_states[0])
    golden.check("t2i_parts", "llm_layer1_out", out.hidden_states[1])
    golden.check("t2i_parts", "llm_last_hidden", out.last_hidden_state)
    golden.check("t2i_parts", "llm_logits", logits)


def test_kv_cache_decoding_equals_full_pass(golden_llm):
    """Prefill a preallocated cache, then feed one token at a time: same hidden states."""
    config, params = golden_llm
    model = qwen3.Qwen3ForCausalLM(config)
    ids = jnp.asarray(golden.arrays("t2i_parts")["llm_input_ids"])
    batch, length = ids.shape
    _, full = model.apply({"params": params}, ids)
    prefix = length // 2
    cache_len = length + 3  # slack slots stay masked
    cache = qwen3.init_kv_cache(config, batch, cache_len)
    mask = qwen3.cache_mask(batch, jnp.arange(prefix), cache_len)
    out = model.apply({"params": params}, ids[:, :prefix], attention_mask=mask, kv_cache=cache,
                      cache_index=0, method="trunk")
    pieces, cache = [out.last_hidden_state], out.kv_cache
    for pos in range(prefix, length):
        mask = qwen3.cache_mask(batch, jnp.array([pos]), cache_len)
        out = model.apply({"params": params}, ids[:, pos:pos + 1], attention_mask=mask,
                          kv_cache=cache, cache_index=pos, method="trunk")
        pieces.append(out.last_hidden_state)
        cache = out.kv_cache
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full.last_hidden_state,
                               rtol=1e-5, atol=1e-5)


def test_block_mask_sees_later_tokens_of_its_block(golden_llm):
    """With ``visible_until`` the first query of a block depends on the block's last token."""
    config, params = golden_llm
    model = qwen3.Qwen3ForCausalLM(config)
    embeds = jax.random.normal(jax.random.key(1), (1, 4, config.hidden_size))
    cache = qwen3.init_kv_cache(config, 1, 4)

    def first_row(x, visible_until):
        mask = qwen3.cache_mask(1, jnp.arange(4), 4, visible_until=visible_until)
        return model.apply({"params": params}, inputs_embeds=x, attention_mask=mask,
                           kv_cache=cache, method="trunk").last_hidden_state[0, 0]

    changed = embeds.at[0, 3].add(1.0)
    assert not np.allclose(first_row(embeds, 4), first_row(changed, 4))
    np.testing.assert_array_equal(first_row(embeds, None), first_row(changed, None))


def _released_llm_entry():
    with open(golden.path("checkpoint_formats.json")) as f:
        return json.load(f)["models"]["BitDance-14B/llm"]


def test_14b_abstract_shapes_match_release():
    """Config derived from the released key shapes; eval_shape allocates nothing."""
    entry = _released_llm_entry()
    released = {k: tuple(s) for k, s, _ in entry["state_dict_16x"]}
    vocab, hidden = released["model.embed_tokens.weight"]
    head_dim = released["model.layers.0.self_attn.q_norm.weight"][0]
    config = qwen3.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=released["model.layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=len({k.split(".")[2] for k in released if k.startswith("model.layers.")}),
        num_attention_heads=released["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=released["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
        head_dim=head_dim)
    assert config == qwen3.QWEN3_14B
    abstract = qwen3.abstract_qwen3_params(config, param_dtype=jnp.bfloat16)
    assert porting.expected_torch_shapes(abstract) == released
    leaves = jax.tree.leaves(nn.unbox(abstract))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == entry["params_16x"]


def test_logical_axes_split_heads_and_mlp_over_tensor(golden_llm):
    config, _ = golden_llm
    specs = traverse_util.flatten_dict(nn.get_partition_spec(qwen3.abstract_qwen3_params(config)),
                                       sep="/")
    layer = "model/layers_0/"
    assert tuple(specs[layer + "self_attn/q_proj/kernel"]) == ("embed", "heads")
    assert tuple(specs[layer + "self_attn/o_proj/kernel"]) == ("heads", "embed")
    assert tuple(specs[layer + "mlp/gate_proj/kernel"]) == ("embed", "mlp")
    assert tuple(specs[layer + "mlp/down_proj/kernel"]) == ("mlp", "embed")
    assert tuple(specs["model/embed_tokens/embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head/kernel"]) == ("embed", "vocab")
    assert all(spec is not None and len(tuple(spec)) > 0 for spec in specs.values())


def test_config_rejects_unsupported():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ValueError, match="rope_scaling"):
        qwen3.Qwen3Config.from_hf_dict({**base, "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="rope_parameters"):
        qwen3.Qwen3Config.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn"}})
    assert qwen3.Qwen3Config.from_hf_dict(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}).rope_theta == 5.0
    with pytest.raises(ValueError, match="num_key_value_heads"):
        qwen3.Qwen3Config.from_hf_dict({**base, "num_key_value_heads": 3, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="lacks"):
        qwen3.Qwen3Config.from_hf_dict({"hidden_size": 8})


def test_matches_hugging_face_transformers(tmp_path):
    """A tiny random Qwen3 saved by transformers: same hidden states and logits here."""
    import torch
    import transformers  # test extra: parity is checked, never skipped
    hf_config = transformers.Qwen3Config(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # random weights everywhere (HF initialises norms to exactly 1)
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)

    config = qwen3.Qwen3Config.from_json(str(tmp_path))
    assert (config.head_dim, config.rope_theta) == (16, 10_000.0)
    state_dict = porting.load_safetensors(str(tmp_path / "model.safetensors"))
    params = porting.convert_state_dict(state_dict, qwen3.abstract_qwen3_params(config))
    ids = np.random.default_rng(0).integers(0, hf_config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_hidden_states=True)
    logits, out = qwen3.Qwen3ForCausalLM(config).apply({"params": params}, jnp.asarray(ids),
                                                      output_hidden_states=True)
    # HF's hidden_states: embeddings, each layer's output, and the last one after the norm.
    for i in range(config.num_hidden_layers):
        np.testing.assert_allclose(out.hidden_states[i], ref.hidden_states[i].numpy(),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.last_hidden_state, ref.hidden_states[-1].numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=1e-5, atol=1e-5)

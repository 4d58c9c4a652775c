"""Porting text-to-image folders (Hugging Face Qwen3 shards, vision head, projector, tokenizer) onto the Flax params."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from bitdance_jax.nn import quant
from bitdance_jax.porting.head import port_head_state_dict
from bitdance_jax.parallel.sharding import divisible_logical_sharding
from bitdance_jax.porting import convention as porting
from bitdance_jax.porting.tokenizer import (infer_tokenizer_config, port_tokenizer_state_dict,
                                           read_ae_config)
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i import io as t2i_io
from bitdance_jax.t2i.config import RELEASED_SIZES, T2IConfig
from bitdance_jax.t2i.model import Projector, abstract_t2i_params
from bitdance_jax.t2i.prompts import TEXT_TOKENIZER_FILES

# The released models' backbone (Qwen3-14B): folders with it get the size whitelist.
_RELEASED_BACKBONE = {"hidden_size": 5120, "num_hidden_layers": 40}
RELEASED_FILES = ("config.json", "tokenizer.json", "ae.safetensors", "ae_config.json",
                  "vision_head.safetensors", "vision_head_config.json", "projector.safetensors")
LLM_SINGLE_FILE = "model.safetensors"
LLM_INDEX_FILE = "model.safetensors.index.json"


def _llm_shard_files(src: str) -> list[str]:
    """The LLM weight files of a folder: the index's shards (all must exist) or model.safetensors."""
    index_path = os.path.join(src, LLM_INDEX_FILE)
    if os.path.isfile(index_path):
        index = porting.read_json(index_path, "LLM shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise porting.PortingError(f"{index_path} has no 'weight_map'")
        # The index is downloaded with the weights: a shard name is one plain file name of
        # this folder, never a path that reads (or, through the port, copies) files elsewhere.
        escaping = [s for s in weight_map.values() if not isinstance(s, str) or not s
                    or s.startswith(".") or os.path.basename(s) != s or "\\" in s]
        if escaping:
            raise porting.PortingError(f"{index_path} names shard(s) outside its folder: "
                                       f"{', '.join(sorted(set(map(repr, escaping))))}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
        if missing:
            raise porting.PortingError(f"{index_path} names missing shard file(s): "
                                       f"{', '.join(missing)}")
        return [os.path.join(src, s) for s in shards]
    single = os.path.join(src, LLM_SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise porting.PortingError(f"{src}: missing LLM weights ({LLM_SINGLE_FILE} or {LLM_INDEX_FILE})")


def stream_llm_weights(shard_files: Sequence[str], abstract, *, shardings=None,
                       ignore: Callable[[str], bool] = lambda k: False,
                       convert: Callable | None = None) -> dict:
    """Port HF Qwen3 safetensors shards onto ``abstract`` one tensor at a time.

    Each tensor is read, transposed to Flax layout, cast to the target dtype, passed through
    ``convert(path, array)`` when given (e.g. quantized) and (with ``shardings``, a tree of
    ``jax.sharding.Sharding`` for the converted leaves) placed on its devices before the next
    one is read, so host memory never holds more than the result plus one tensor. Strict like
    ``porting.convert_state_dict``.
    """
    from safetensors import SafetensorError, safe_open

    flat_target = traverse_util.flatten_dict(nn.unbox(abstract))
    by_key = {key: path for path, key in porting.porting_map(abstract).items()}
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else None
    out, extra, bad_shape, mis_shaped = {}, [], [], set()
    for shard in shard_files:
        try:
            handle = safe_open(shard, framework="np")
        except (SafetensorError, OSError) as e:
            raise porting.PortingError(f"cannot read {shard} as safetensors: {e}") from e
        with handle as f:
            for key in f.keys():
                path = by_key.get(key)
                if path is None:
                    if not ignore(key):
                        extra.append(key)
                    continue
                value = porting.torch_to_flax_array(path[-1], f.get_tensor(key))
                target = flat_target[path]
                if tuple(value.shape) != tuple(target.shape):
                    bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model "
                                     f"{tuple(target.shape)}")
                    mis_shaped.add(key)
                    continue
                value = np.asarray(value, dtype=target.dtype)
                if convert is not None:
                    value = convert(path, value)
                out[path] = (jax.device_put(value, flat_shardings[path])
                             if flat_shardings is not None else value)
    missing = sorted(key for key, path in by_key.items()
                     if path not in out and key not in mis_shaped)
    porting.raise_if_mismatch("LLM weights (config.json)", missing, extra, bad_shape)
    return traverse_util.unflatten_dict(out)


def _check_released_folder(src: str):
    if not os.path.isdir(src):
        raise porting.PortingError(f"{src} is not a directory")
    missing = [f for f in RELEASED_FILES if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise porting.PortingError(f"text-to-image folder {src} is missing file(s): "
                                   f"{', '.join(missing)}")


def read_released_config(src: str) -> T2IConfig:
    """The T2I config of a released-layout folder (reads only its JSON files)."""
    _check_released_folder(src)
    llm_dict = porting.read_json(os.path.join(src, "config.json"), "LLM config")
    llm = qwen3.Qwen3Config.from_hf_dict(llm_dict)
    head_kwargs = porting.read_json(os.path.join(src, "vision_head_config.json"), "vision head config")
    tok = read_ae_config(os.path.join(src, "ae_config.json"))
    released = all(llm_dict.get(k) == v for k, v in _RELEASED_BACKBONE.items())
    return T2IConfig(llm=llm, head_kwargs=head_kwargs, tokenizer=tok,
                     supported_sizes=RELEASED_SIZES if released else None)


def read_released_folder(src: str, *, param_dtype=jnp.float32, mesh=None,
                         quantize: str | None = None):
    """``(config, params)`` of a released-layout folder; with ``mesh`` every LLM tensor is
    placed on its logical sharding as it is read. ``quantize`` ("int8", "fp8"): each LLM
    kernel is quantized as it is read (``nn.quant``), the head and projector once read."""
    config = read_released_config(src)
    abstract = qwen3.abstract_qwen3_params(config.llm, param_dtype=param_dtype)
    convert = None
    q_abstract = None
    if quant.check_mode(quantize) is not None:
        q_abstract = abstract_t2i_params(config, param_dtype, quantize)
        flat_q = traverse_util.flatten_dict(nn.unbox(q_abstract["llm"]),
                                            is_leaf=lambda _, v: quant.is_quantized(v))
        convert = lambda path, value: quant.quantize_leaf(value, flat_q[path])
    shardings = None
    if mesh is not None:
        shardings = divisible_logical_sharding(abstract if q_abstract is None
                                               else q_abstract["llm"], mesh)
    tied = config.llm.tie_word_embeddings
    llm = stream_llm_weights(_llm_shard_files(src), abstract, shardings=shardings,
                             ignore=lambda k: tied and k == "lm_head.weight", convert=convert)
    ae_sd = porting.load_safetensors(os.path.join(src, "ae.safetensors"))
    inferred = infer_tokenizer_config(ae_sd, num_codebooks=config.tokenizer.num_codebooks)
    if inferred != config.tokenizer:
        raise porting.PortingError(f"ae.safetensors ({inferred}) does not match ae_config.json "
                                   f"({config.tokenizer})")
    tok = port_tokenizer_state_dict(ae_sd, config.tokenizer, what=os.path.join(src, "ae.safetensors"))
    head = port_head_state_dict(porting.load_safetensors(os.path.join(src, "vision_head.safetensors")),
                                config.head, prefix="net.", param_dtype=param_dtype)
    proj_abstract = porting.abstract_params(
        Projector(config.llm.hidden_size, param_dtype=param_dtype),
        jax.ShapeDtypeStruct((1, 1, config.tokenizer.z_channels), jnp.float32))
    projector = porting.convert_state_dict(
        porting.load_safetensors(os.path.join(src, "projector.safetensors")), proj_abstract,
        what=os.path.join(src, "projector.safetensors"))
    if q_abstract is not None:
        head = quant.quantize_tree(head, nn.unbox(q_abstract["head"]))
        projector = quant.quantize_tree(projector, nn.unbox(q_abstract["projector"]))
    return config, {"llm": llm, "head": head, "projector": projector, "tokenizer": tok}


def port_t2i_folder(src: str, dst: str, *, param_dtype=jnp.float32, overwrite: bool = False,
                    quantize: str | None = None) -> str:
    """Released folder -> self-describing dir (``bitdance.json`` + Orbax params + text
    tokenizer files). The tokenizer part is also loadable with ``load_tokenizer(dst)``.
    ``quantize``: write int8/fp8 kernels with their scales (quantized as they are read)."""
    config, params = read_released_folder(src, param_dtype=param_dtype, quantize=quantize)
    files = {name: os.path.join(src, name) for name in TEXT_TOKENIZER_FILES
             if os.path.isfile(os.path.join(src, name))}
    return t2i_io.save_t2i(dst, config, params, source=os.path.basename(os.path.abspath(src)),
                           text_tokenizer_files=files, overwrite=overwrite, quantize=quantize)


# Fields of config.llm that must equal a pretrained folder's config.json (vocab_size may grow).
_LLM_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                    "attention_bias")


def check_llm_folder(src: str, llm: qwen3.Qwen3Config) -> qwen3.Qwen3Config:
    """The Qwen3 config of a plain Hugging Face folder, after checking that ``llm`` (the
    configured backbone, untied, ``vocab_size`` at least the folder's or 0 for "grown to
    fit") can take its weights."""
    if not os.path.isdir(src):
        raise ValueError(f"init_from_llm {src!r} is not a directory")
    try:
        folder = qwen3.Qwen3Config.from_json(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"init_from_llm {src}: {e}") from e
    bad = [f"{k}={getattr(folder, k)!r} (config.llm has {getattr(llm, k)!r})"
           for k in _LLM_ARCH_FIELDS if getattr(folder, k) != getattr(llm, k)]
    if bad:
        raise ValueError(f"config.llm does not match {os.path.join(src, 'config.json')}: set "
                         + ", ".join(bad))
    if llm.tie_word_embeddings:
        raise ValueError("training from a pretrained LLM keeps a separate LM head "
                         "(tie_word_embeddings=False)")
    if llm.vocab_size and llm.vocab_size < folder.vocab_size:
        raise ValueError(f"config.llm.vocab_size {llm.vocab_size} is smaller than the "
                         f"vocabulary of {src} ({folder.vocab_size})")
    return folder


def read_llm_for_training(src: str, llm: qwen3.Qwen3Config, new_ids, *,
                          param_dtype=jnp.float32) -> dict:
    """Qwen3 params of ``llm`` from a plain Hugging Face folder whose vocabulary grows to
    ``llm.vocab_size`` (numpy, host memory).

    Every weight is the folder's except the "new rows" of the input embedding and of the LM
    head: the ids in ``new_ids`` (tokens added to its tokenizer, possibly inside its padded
    vocabulary) and every id past the folder's vocabulary. A new row is the mean of the other
    rows. Mean rather than N(0, 0.02): a new input embedding then has the scale and direction
    of the pretrained ones (the first norm and attention see an ordinary token), and a new LM
    head row gives the average logit rather than a logit near 0, which for a trained head lies
    far above most tokens' logits and would at first pull probability mass onto the new tokens
    (Hewitt, "Initializing new word embeddings for pretrained language models", 2021). The new
    rows start equal; the contexts they are used in set them apart. A folder with tied
    embeddings gets a separate LM head starting from its embedding.
    """
    folder = check_llm_folder(src, llm)
    tied = folder.tie_word_embeddings
    abstract = qwen3.abstract_qwen3_params(folder, param_dtype=param_dtype)
    params = stream_llm_weights(_llm_shard_files(src), abstract,
                                ignore=lambda k: tied and k == "lm_head.weight")
    embed = np.asarray(params["model"]["embed_tokens"]["embedding"])      # [V0, D]
    head = embed.T if tied else np.asarray(params["lm_head"]["kernel"])   # [D, V0]
    v0, vocab = folder.vocab_size, llm.vocab_size
    new = np.zeros(vocab, bool)
    new[v0:] = True
    new[np.asarray(list(new_ids), np.int64)] = True
    old = ~new[:v0]
    grown_embed = np.empty((vocab, embed.shape[1]), embed.dtype)
    grown_embed[:v0] = embed
    grown_embed[new] = embed[old].mean(axis=0, dtype=np.float32).astype(embed.dtype)
    grown_head = np.empty((head.shape[0], vocab), head.dtype)
    grown_head[:, :v0] = head
    grown_head[:, new] = head[:, old].mean(axis=1, dtype=np.float32).astype(head.dtype)[:, None]
    params["model"]["embed_tokens"]["embedding"] = grown_embed
    params["lm_head"] = {"kernel": grown_head}
    return params

"""Text-to-image model against the reference: parts, every LLM call of gen_image, whole
sampling runs, porting the released folder (single file and sharded), bad input, CLI."""
import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

import golden
from bitdance_jax.checkpointing import param_dir
from bitdance_jax.porting import convention as porting
from bitdance_jax.porting import t2i as port_t2i
from bitdance_jax.t2i import cli as t2i_cli
from bitdance_jax.t2i import config as t2i_config
from bitdance_jax.t2i import model as t2i_model
from bitdance_jax.t2i import pipeline as t2i
from bitdance_jax.t2i import prompts as t2i_prompts
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i import sampler as t2i_sampler


GOLDEN_NUMERICS = dict(dtype="float32", precision=golden.MATMUL_PRECISION)


def _model_dir():
    return golden.path(golden.case("t2i_gen")["config"]["model_dir"])


@pytest.fixture(scope="module")
def pipe():
    return t2i.load_t2i(_model_dir(), **GOLDEN_NUMERICS)


def _user_prompt(cfg):
    """The prompt inside the case's chat-formatted cond prompt."""
    prefix, suffix = t2i_prompts.cond_prompt("\0").split("\0")
    full = cfg["cond_prompt"]
    assert full.startswith(prefix) and full.endswith(suffix)
    return full[len(prefix):len(full) - len(suffix)]


def _noise_source(run, arrays):
    def source(shape):
        if run["noise"] == "zeros":
            return np.zeros(shape, np.float32)
        names = sorted((k for k in arrays if k.startswith(run["prefix"] + "noise_")),
                       key=lambda k: int(k.rsplit("_", 1)[1]))
        draws = np.stack([arrays[k] for k in names])
        assert draws.size == np.prod(shape), (draws.shape, shape)
        return draws.reshape(shape)
    return source


# ----------------------------------------------------------------------------- parts

def test_projector_and_position_embeddings(pipe):
    a = golden.arrays("t2i_parts")
    cfg = golden.case("t2i_parts")["config"]
    assert pipe.config.vae_patch_size == cfg["vae_patch_size"]
    assert pipe.config.llm.hidden_size == cfg["hidden_size"]
    golden.check("t2i_parts", "projector_out", pipe.project(a["projector_in"]))
    first = a["pos_embed_1d_first64"]
    golden.check("t2i_parts", "pos_embed_1d_first64", pipe.pos_table[:first.shape[0]])
    names = [k for k in a if k.startswith("embed2d_")]
    assert names
    for name in names:
        h, w, ps = map(int, re.fullmatch(r"embed2d_h(\d+)_w(\d+)_ps(\d+)", name).groups())
        golden.check("t2i_parts", name, pipe.position_embed_2d(h, w, ps))


def test_text_tokenization(pipe):
    parts = golden.arrays("t2i_parts")
    cfg = golden.case("t2i_gen")["config"]
    tok = pipe.text_tokenizer
    golden.check("t2i_parts", "llm_input_ids", np.array([tok.encode(cfg["cond_prompt"])]))
    assert t2i_prompts.cond_prompt(_user_prompt(cfg)) == cfg["cond_prompt"]
    golden.check("t2i_gen", "cond_ids", np.array(tok.encode(cfg["cond_prompt"])))
    golden.check("t2i_gen", "uncond_ids", np.array(tok.encode(cfg["uncond_prompt"])))
    assert cfg["uncond_prompt"] == t2i_prompts.UNCOND_PROMPT
    h, w = pipe.config.latent_grid(*cfg["image_size"])
    golden.check("t2i_gen", "special_ids",
                 np.array(tok.image_prefix_ids(h, w, pipe.config.parallel_num)))
    assert parts["llm_input_ids"].shape[0] == 1


# ----------------------------------------------------------------------------- LLM calls

def _llm_call_plan(run):
    """(stream, mask) per recorded call: cond prompt+block, then uncond's if guided, then one
    call per stream per step (cond first)."""
    masks = run["llm_call_masks"]
    guided = run["guidance_scale"] > 1
    streams = ["c", "c", "u", "u"] if guided else ["c", "c"]
    while len(streams) < len(masks):
        streams += ["c", "u"] if guided else ["c"]
    assert len(streams) == run["llm_calls"] == len(masks)
    return list(zip(streams, masks))


def _runs_with_llm_calls():
    arrays = golden.arrays("t2i_gen")
    return [i for i, run in enumerate(golden.case("t2i_gen")["config"]["runs"])
            if f"{run['prefix']}llm00_last_hidden" in arrays]


@pytest.mark.parametrize("run_index", _runs_with_llm_calls())
def test_every_llm_call_with_kv_cache(pipe, run_index):
    """Replay the recorded LLM inputs through our cached Qwen3: causal prompt call, then
    all-True block masks over the cache, separate caches for cond and uncond."""
    cfg = golden.case("t2i_gen")["config"]
    run = cfg["runs"][run_index]
    a = golden.arrays("t2i_gen")
    model = qwen3.Qwen3ForCausalLM(pipe.config.llm, precision=golden.MATMUL_PRECISION)
    params = {"params": pipe.params["llm"]}
    plan = _llm_call_plan(run)
    total = {s: sum(a[f"{run['prefix']}llm{i:02d}_inputs_embeds"].shape[1]
                    for i, (st, _) in enumerate(plan) if st == s) for s, _ in plan}
    caches, filled = {}, {}
    for i, (stream, mask_shape) in enumerate(plan):
        embeds = a[f"{run['prefix']}llm{i:02d}_inputs_embeds"]
        batch, length, _ = embeds.shape
        if stream not in caches:
            caches[stream] = qwen3.init_kv_cache(pipe.config.llm, batch, total[stream])
            filled[stream] = 0
        start = filled[stream]
        if mask_shape is None:
            assert start == 0
            mask = qwen3.cache_mask(batch, jnp.arange(length), total[stream])
        else:
            # The reference builds both streams' all-True masks from the cond cache length;
            # HF cuts a longer mask to the key length, so uncond's is at least as long.
            assert mask_shape[:3] == [batch, 1, length]
            assert (mask_shape[3] == length + start if stream == "c"
                    else mask_shape[3] >= length + start)
            mask = qwen3.cache_mask(batch, start + jnp.arange(length), total[stream],
                                    visible_until=start + length)
        out = model.apply(params, inputs_embeds=jnp.asarray(embeds), attention_mask=mask,
                          kv_cache=caches[stream], cache_index=start, method="trunk")
        caches[stream], filled[stream] = out.kv_cache, start + length
        golden.check("t2i_gen", f"{run['prefix']}llm{i:02d}_last_hidden", out.last_hidden_state)


def test_first_llm_call_inputs(pipe):
    """Call 0's inputs: embeddings of the prompt ids, <|vision_start|>, <|res_h|>."""
    cfg = golden.case("t2i_gen")["config"]
    h, w = pipe.config.latent_grid(*cfg["image_size"])
    prefix = pipe.text_tokenizer.image_prefix_ids(h, w, pipe.config.parallel_num)
    for run in [cfg["runs"][i] for i in _runs_with_llm_calls()]:
        ids = pipe.text_tokenizer.encode(cfg["cond_prompt"]) + prefix[:2]
        ids = np.tile(np.array(ids)[None], (run["num_images"], 1))
        ours = pipe.llm.apply({"params": pipe.params["llm"]}, jnp.asarray(ids), method="embed")
        golden.check("t2i_gen", f"{run['prefix']}llm00_inputs_embeds", ours)
        block = pipe.llm.apply({"params": pipe.params["llm"]}, jnp.asarray(prefix[2:]), method="embed")
        golden.check("t2i_gen", f"{run['prefix']}llm01_inputs_embeds",
                     np.tile(np.asarray(block)[None], (run["num_images"], 1, 1)))


# ----------------------------------------------------------------------------- whole runs

def _check_run(pipe, run):
    cfg = golden.case("t2i_gen")["config"]
    a = golden.arrays("t2i_gen")
    bits, trace = pipe.sample_latents(
        _user_prompt(cfg), *cfg["image_size"], num_sampling_steps=cfg["num_sampling_steps"],
        guidance_scale=run["guidance_scale"], num_images=run["num_images"],
        noise_source=_noise_source(run, a), trace=True)
    pre = run["prefix"]
    golden.check("t2i_gen", pre + "head_cond", trace.head_cond)
    golden.check("t2i_gen", pre + "head_pred", trace.head_pred)
    golden.check("t2i_gen", pre + "latent_tokens", np.moveaxis(np.asarray(bits), -1, 1))
    golden.check("t2i_gen", pre + "image", np.moveaxis(np.asarray(pipe.decode_latents(bits)), -1, 1))
    return bits


@pytest.mark.parametrize("run_index", range(len(golden.case("t2i_gen")["config"]["runs"])))
def test_gen_image_runs(pipe, run_index):
    _check_run(pipe, golden.case("t2i_gen")["config"]["runs"][run_index])


def test_generate_returns_pil_images(pipe):
    cfg = golden.case("t2i_gen")["config"]
    run = cfg["runs"][-1]
    images = pipe.generate(_user_prompt(cfg), *cfg["image_size"],
                           num_sampling_steps=cfg["num_sampling_steps"],
                           guidance_scale=run["guidance_scale"], num_images=run["num_images"],
                           noise_source=_noise_source(run, golden.arrays("t2i_gen")))
    golden_images = golden.arrays("t2i_gen")[run["prefix"] + "image"]
    assert len(images) == golden_images.shape[0]
    expected = np.clip(127.5 * golden.nchw_to_nhwc(golden_images) + 128.0, 0, 255)
    for im, ref in zip(images, expected):
        assert im.size == (ref.shape[1], ref.shape[0]) and im.mode == "RGB"
        assert np.abs(np.asarray(im, np.float32) - ref).max() <= 1.0


# ----------------------------------------------------------------------------- porting

def test_port_then_load_matches_golden(tmp_path):
    dst = port_t2i.port_t2i_folder(_model_dir(), str(tmp_path / "ported"))
    meta = param_dir.read_meta(dst)
    assert meta["kind"] == t2i_config.KIND
    from bitdance_jax.tokenizer.api import load_tokenizer
    assert load_tokenizer(dst).config == t2i_config.T2IConfig.from_dict(meta["config"]).tokenizer
    ported = t2i.load_t2i(dst, **GOLDEN_NUMERICS)
    a = golden.arrays("t2i_parts")
    golden.check("t2i_parts", "projector_out", ported.project(a["projector_in"]))
    _check_run(ported, golden.case("t2i_gen")["config"]["runs"][0])
    import jax
    from bitdance_jax.parallel.sharding import make_mesh
    if len(jax.devices()) >= 8:  # restored straight onto a mesh, in bfloat16
        mesh = make_mesh((1, 2, 4), devices=jax.devices()[:8])
        on_mesh = t2i.load_t2i(dst, mesh=mesh, param_dtype=jnp.bfloat16)
        gate = on_mesh.params["llm"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
        assert gate.dtype == jnp.bfloat16
        assert gate.sharding.shard_shape(gate.shape) == (gate.shape[0] // 2, gate.shape[1] // 4)
        np.testing.assert_array_equal(
            np.asarray(gate, np.float32),
            np.asarray(ported.params["llm"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
                       ).astype(jnp.bfloat16).astype(np.float32))


def _sharded_copy(src, dst, num_shards=2):
    """The folder with model.safetensors split into shards plus an HF index."""
    shutil.copytree(src, dst)
    sd = porting.load_safetensors(os.path.join(dst, port_t2i.LLM_SINGLE_FILE))
    os.remove(os.path.join(dst, port_t2i.LLM_SINGLE_FILE))
    keys = sorted(sd)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[i::num_shards]
        save_file({k: sd[k] for k in part}, os.path.join(dst, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(dst, port_t2i.LLM_INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


def test_sharded_folder_streams_to_same_params(tmp_path, pipe):
    folder = _sharded_copy(_model_dir(), str(tmp_path / "sharded"))
    config, params = port_t2i.read_released_folder(folder)
    assert config == pipe.config
    flat = traverse_util.flatten_dict(params["llm"])
    ref = traverse_util.flatten_dict(pipe.params["llm"])
    assert flat.keys() == ref.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], ref[k])
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(porting.PortingError, match="model-00002-of-00002"):
        t2i.load_t2i(folder)


@pytest.mark.parametrize("missing", port_t2i.RELEASED_FILES + (port_t2i.LLM_SINGLE_FILE,))
def test_folder_missing_a_file(tmp_path, missing):
    folder = str(tmp_path / "folder")
    shutil.copytree(_model_dir(), folder)
    os.remove(os.path.join(folder, missing))
    with pytest.raises((porting.PortingError, FileNotFoundError), match=re.escape(missing)):
        t2i.load_t2i(folder)


def test_llm_weights_must_match_config(tmp_path):
    folder = str(tmp_path / "folder")
    shutil.copytree(_model_dir(), folder)
    sd = porting.load_safetensors(os.path.join(folder, port_t2i.LLM_SINGLE_FILE))
    sd.pop("model.norm.weight")
    sd["model.extra.weight"] = np.zeros(1, np.float32)
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = sd[key][:-1]
    save_file(sd, os.path.join(folder, port_t2i.LLM_SINGLE_FILE))
    with pytest.raises(porting.PortingError,
                       match=r"1 missing key\(s\): model.norm.weight .*model.extra.weight.*"
                             r"1 shape mismatch\(es\): " + re.escape(key)):
        t2i.load_t2i(folder)


# ----------------------------------------------------------------------------- bad input, CLI

def test_sizes(pipe):
    config = pipe.config
    f, p = config.vae_patch_size, config.patch_side
    assert config.supported_sizes is None  # a small test model takes any p x p-divisible grid
    assert config.latent_grid(2 * f * p, f * p) == (2 * p, p)
    with pytest.raises(ValueError, match="multiples"):
        config.latent_grid(f * p + 1, f * p)
    released = dataclasses.replace(config, supported_sizes=t2i_config.RELEASED_SIZES)
    assert len(set(t2i_config.RELEASED_SIZES)) == len(t2i_config.RELEASED_SIZES)
    with pytest.raises(ValueError, match="not supported"):
        released.latent_grid(2 * f * p, f * p)
    side = next(g for g in range(p, t2i_config.POS_EMBED_MAX_PIXELS // f + 1, p)
                if not pipe.text_tokenizer.has_token(f"<|res_{g}|>"))
    with pytest.raises(ValueError, match="resolution token"):
        pipe.sample_latents("x", side * f, p * f, num_sampling_steps=1, guidance_scale=1.0)


@pytest.mark.slow
def test_cli_prompts_file(tmp_path, capsys):
    cfg = golden.case("t2i_gen")["config"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue ball\n")
    out_dir = tmp_path / "out"
    height, width = cfg["image_size"]
    rc = t2i_cli.main(["--ckpt", _model_dir(), "--prompts-file", str(prompts), "--out-dir", str(out_dir),
                   "--height", str(height), "--width", str(width), "--steps", "1",
                   "--guidance-scale", "1.0", "--dtype", "bfloat16", "--batch-size", "2"])
    assert rc == 0
    assert sorted(os.listdir(out_dir)) == [".bitdance_run.json", "00000.png", "00001.png"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert t2i_cli.main(["--ckpt", _model_dir(), "--prompts-file", str(empty), "--out-dir",
                     str(out_dir)]) == 1
    assert "no prompts" in capsys.readouterr().err
    assert t2i_cli.main(["--ckpt", _model_dir(), "--prompt", "x", "--out", str(tmp_path / "x.png"),
                     "--height", str(height + 1), "--width", str(width)]) == 1
    # One prompt, two images: per-step progress bar from inside the jitted loop.
    assert t2i_cli.main(["--ckpt", _model_dir(), "--prompt", "a red cube", "--out",
                     str(tmp_path / "one.png"), "--height", str(height), "--width", str(width),
                     "--steps", "1", "--guidance-scale", "2.0", "--num-images", "2"]) == 0
    assert (tmp_path / "one_0.png").is_file() and (tmp_path / "one_1.png").is_file()
    assert "image steps" in capsys.readouterr().err


@pytest.mark.slow
def test_sharded_sampling_equals_unsharded(pipe):
    """Params over a (data 1, fsdp 2, tensor 4) mesh of 8 simulated CPU devices: same tokens."""
    import jax
    from bitdance_jax.parallel.sharding import make_mesh
    assert len(jax.devices()) >= 8, "conftest simulates 8 CPU devices; XLA_FLAGS overrode it"
    cfg = golden.case("t2i_gen")["config"]
    run = max(cfg["runs"], key=lambda r: (r["guidance_scale"] > 1, r["num_images"]))
    mesh = make_mesh((1, 2, 4), devices=jax.devices()[:8])
    sharded = t2i.load_t2i(_model_dir(), mesh=mesh, **GOLDEN_NUMERICS)
    q_proj = sharded.params["llm"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.sharding.shard_shape(q_proj.shape) == (q_proj.shape[0] // 2, q_proj.shape[1] // 4)
    kwargs = dict(num_sampling_steps=cfg["num_sampling_steps"], guidance_scale=run["guidance_scale"],
                  num_images=run["num_images"], noise_source=_noise_source(run, golden.arrays("t2i_gen")),
                  trace=True)
    bits, trace = sharded.sample_latents(_user_prompt(cfg), *cfg["image_size"], **kwargs)
    ref_bits, ref_trace = pipe.sample_latents(_user_prompt(cfg), *cfg["image_size"], **kwargs)
    np.testing.assert_array_equal(np.asarray(bits), np.asarray(ref_bits))
    # Sharded matmuls sum in another order; the sampler amplifies that (see golden tolerances).
    np.testing.assert_allclose(trace.head_cond, ref_trace.head_cond, rtol=1e-5, atol=1e-5)
    golden.check("t2i_gen", run["prefix"] + "head_pred", trace.head_pred)
    golden.check("t2i_gen", run["prefix"] + "latent_tokens", np.moveaxis(np.asarray(bits), -1, 1))


@pytest.mark.parametrize("variant", ["16x", "64x"])
def test_released_14b_config_and_shapes(tmp_path, variant):
    """A folder with the released JSON configs (weights absent): its config, the size
    whitelist for every released size, and eval_shape of projector/head vs the release."""
    with open(golden.path("checkpoint_formats.json")) as f:
        models = json.load(f)["models"]
    llm = models["BitDance-14B/llm"]
    released_llm = {k: tuple(s) for k, s, _ in llm[f"state_dict_{variant}"]} \
        if f"state_dict_{variant}" in llm else None
    head_entry = models[f"BitDance-14B-{variant}/vision_head"]
    base = qwen3.QWEN3_14B
    vocab = llm["vocab_guess"][variant]
    hf_config = {"hidden_size": base.hidden_size, "intermediate_size": base.intermediate_size,
                 "num_hidden_layers": base.num_hidden_layers,
                 "num_attention_heads": base.num_attention_heads,
                 "num_key_value_heads": base.num_key_value_heads, "head_dim": base.head_dim,
                 "rope_theta": base.rope_theta, "rms_norm_eps": base.rms_norm_eps,
                 "vocab_size": vocab, "tie_word_embeddings": False}
    folder = tmp_path / "BitDance-14B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    (folder / "vision_head_config.json").write_text(json.dumps(head_entry["vision_head_config"]))
    (folder / "ae_config.json").write_text(json.dumps(
        {"ddconfig": models["BitDance-14B/ae"]["ddconfig"], "gan_decoder": False}))
    for name in port_t2i.RELEASED_FILES:
        (folder / name).touch(exist_ok=True)
    config = port_t2i.read_released_config(str(folder))
    assert config.supported_sizes == t2i_config.RELEASED_SIZES
    assert config.parallel_num == head_entry["vision_head_config"]["parallel_num"]
    for height, width in t2i_config.RELEASED_SIZES:
        h, w = config.latent_grid(height, width)
        assert h * w % config.parallel_num == 0
    with pytest.raises(ValueError, match="not supported"):
        config.latent_grid(1024, 512)

    abstract = t2i_model.abstract_t2i_params(config, param_dtype=jnp.bfloat16)
    head_shapes = {"net." + k: v for k, v in porting.expected_torch_shapes(abstract["head"]).items()}
    assert head_shapes == {k: tuple(s) for k, s, _ in head_entry["state_dict"]}
    assert porting.expected_torch_shapes(abstract["projector"]) == {
        k: tuple(s) for k, s, _ in models["BitDance-14B/projector"]["state_dict"]}
    llm_shapes = porting.expected_torch_shapes(abstract["llm"])
    assert llm_shapes["model.embed_tokens.weight"] == (vocab, base.hidden_size)
    if released_llm is not None:
        assert llm_shapes == released_llm


def test_prompt_batch_rows_are_independent(pipe):
    """Several prompts of different lengths in one call (padded prompt slots): the golden
    prompt's row reproduces its zero-noise run."""
    cfg = golden.case("t2i_gen")["config"]
    zero_runs = [r for r in cfg["runs"] if r["noise"] == "zeros"]
    run = max(zero_runs, key=lambda r: r["guidance_scale"])
    other = "a much longer prompt " * 3
    bits = pipe.sample_latents([other, _user_prompt(cfg)], *cfg["image_size"],
                               num_sampling_steps=cfg["num_sampling_steps"],
                               guidance_scale=run["guidance_scale"], num_images=run["num_images"],
                               noise_source=lambda shape: np.zeros(shape, np.float32))
    ours = np.moveaxis(np.asarray(bits[run["num_images"]:]), -1, 1)
    golden.check("t2i_gen", run["prefix"] + "latent_tokens", ours)


def test_prompt_slots_pad_to_one_bucket_and_refuse_longer_prompts(pipe):
    """The demo pads every prompt to one warmed bucket: the golden zero-noise run still holds
    at twice the slots, and a prompt longer than the slots is refused, never compiled anew."""
    cfg = golden.case("t2i_gen")["config"]
    run = next(r for r in cfg["runs"] if r["noise"] == "zeros")
    prompt = _user_prompt(cfg)
    slots = 2 * t2i_sampler.prompt_bucket(pipe.prompt_tokens(prompt))
    bits = pipe.sample_latents(prompt, *cfg["image_size"], num_sampling_steps=cfg["num_sampling_steps"],
                               guidance_scale=run["guidance_scale"], num_images=run["num_images"],
                               noise_source=lambda shape: np.zeros(shape, np.float32),
                               prompt_slots=slots)
    golden.check("t2i_gen", run["prefix"] + "latent_tokens", np.moveaxis(np.asarray(bits), -1, 1))
    too_long = "cube " * slots
    assert pipe.prompt_tokens(too_long) > slots
    with pytest.raises(ValueError, match=f"does not fit in {slots} prompt slots"):
        pipe.sample_latents(too_long, *cfg["image_size"], num_sampling_steps=1,
                            guidance_scale=1.0, prompt_slots=slots)
    with pytest.raises(ValueError, match="multiple of 64"):
        pipe.sample_latents(prompt, *cfg["image_size"], num_sampling_steps=1, prompt_slots=100)

"""Text-to-image training: packed masks, segment isolation and caption dropout of the loss,
training on captioned digits (loss goes down, exact resume), export -> T2IPipeline, bad input.

Everything uses a random tiny binary tokenizer (2x down, 8 bits) on 8x8 digits, a 1-layer
Qwen3 and a word-level text tokenizer built here, so the file stays fast on 2 CPU cores.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from bitdance_jax.checkpointing import fingerprint
from bitdance_jax.checkpointing.param_dir import load_param_dir, read_meta
from bitdance_jax.configs.common import t2i_base_config
from bitdance_jax.data import captions as caption_sources
from bitdance_jax.data import packing
from bitdance_jax.data.word_tokenizer import build_word_tokenizer
from bitdance_jax.nn import patching
from bitdance_jax.parallel import sharding
from bitdance_jax.t2i import qwen3
from bitdance_jax.t2i.config import T2IConfig
from bitdance_jax.t2i.loss import PackedT2IModel, apply_caption_drop, packed_attention_mask
from bitdance_jax.t2i.pipeline import T2IPipeline, load_t2i
from bitdance_jax.t2i.prompts import UNCOND_PROMPT, TextTokenizer
from bitdance_jax.tokenizer.api import save_tokenizer
from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig
from bitdance_jax.train import checkpoints
from bitdance_jax.train import trainer as train
from bitdance_jax.train.tasks.t2i import T2ITask, text_vocab_size

CAPTIONS = [caption_sources.digit_caption(d) for d in range(10)] + [
    "a handwritten digit seven drawn with a thick black pen on white paper"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    cfg = TokenizerConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, num_codebooks=2)
    params = jax.jit(BinaryAutoencoder(cfg).init)(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 8, 8, 3)))["params"]
    return save_tokenizer(str(tmp_path_factory.mktemp("tok")), cfg,
                          jax.device_get(nn.unbox(params)), overwrite=True)


def tiny_config(tokenizer_dir, **kw):
    c = t2i_base_config()
    c.tokenizer_dir = tokenizer_dir
    c.llm.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    c.head.update(dict(ch_latent=128, depth_latent=1, depth_adanln=1, parallel_num=4,
                       diff_batch_mul=2))
    c.data.image_size = 8
    c.data.buckets = ((8, 8),)
    c.data.max_samples_per_row = 3
    c.data.num_threads = 1
    c.global_batch_size = 2
    c.num_steps = 8
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 1
    c.optim.decay_start = 6
    c.optim.ema_decay = 0.5
    c.log_every = 4
    c.checkpoint.every_steps = 4
    c.update_from_flattened_dict(kw)
    return c


def one_device_mesh():
    return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


# ---------------------------------------------------------------------------------------
# Packing and masks.

@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("text") / "tokenizer.json")
    build_word_tokenizer(path, CAPTIONS, max_latent_side=8, parallel_num=4)
    return TextTokenizer(path)


def sample_texts(text_tokenizer, grids):
    tok = packing.SampleTokenizer(text_tokenizer, 4)
    return [tok(CAPTIONS[k], *g) for k, g in zip((7, 10, 3), grids)]


GRIDS = [(4, 4), (2, 4), (4, 2)]  # latent grids of 4, 2 and 2 blocks of 2x2


def brute_force_mask(texts, grids, seq_len, parallel_num, dropped=()):
    """[L, L] straight from the rules: causal over each caption, bidirectional inside each
    block of P image positions, causal between blocks, nothing across samples or into
    padding or into a dropped caption."""
    kinds = []  # per position: (sample, "text", index) or (sample, "block", index)
    hidden = set()
    for j, (text, (h, w)) in enumerate(zip(texts, grids)):
        for i in range(len(text.text_ids)):
            if j in dropped and i < text.caption_len:
                hidden.add(len(kinds))
            kinds.append((j, "text", i))
        for m in range(h * w // parallel_num):
            kinds += [(j, "block", m)] * parallel_num
    mask = np.zeros((seq_len, seq_len), bool)
    for q, (jq, kq, iq) in enumerate(kinds):
        for k, (jk, kk, ik) in enumerate(kinds):
            if jq != jk or k in hidden:
                continue
            if kq == "text" and kk == "text":
                mask[q, k] = ik <= iq
            elif kq == "block" and kk == "text":
                mask[q, k] = True
            elif kq == "block" and kk == "block":
                mask[q, k] = ik <= iq
    return mask


def test_packed_mask_matches_brute_force(text_tokenizer):
    texts = sample_texts(text_tokenizer, GRIDS)
    spec = packing.RowSpec(seq_len=sum(len(t.text_ids) for t in texts) + 4 * 8 + 5,
                            max_samples=4, max_blocks=4, parallel_num=4)
    row = packing.pack_row(texts, GRIDS, spec, patch_side=2)
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    ours = packed_attention_mask(batch["segment_ids"], batch["block_ids"])[0]
    np.testing.assert_array_equal(np.asarray(ours), brute_force_mask(texts, GRIDS, spec.seq_len, 4))
    dropped = jnp.asarray([[False, True, False, False]])
    _, visible, _ = apply_caption_drop(batch, dropped)
    ours = packed_attention_mask(batch["segment_ids"], batch["block_ids"], visible)[0]
    np.testing.assert_array_equal(np.asarray(ours), brute_force_mask(texts, GRIDS, spec.seq_len,
                                                                     4, dropped={1}))
    # Fed-back image tokens: block m+1 of each sample holds the latents of image block m.
    start = len(texts[0].text_ids)
    np.testing.assert_array_equal(row["image_feed"][start:start + 4], -1)
    np.testing.assert_array_equal(row["image_feed"][start + 4:start + 16], np.arange(12))
    np.testing.assert_array_equal(row["cond_start"][0], start + 4 * np.arange(4))


def test_packed_loss_equals_separate_samples(text_tokenizer, tokenizer_dir):
    """Each sample of a packed row gets exactly the losses it gets alone, and a dropped
    caption gives exactly the losses of the unconditional prompt."""
    from bitdance_jax.tokenizer.api import load_tokenizer
    tok_cfg = load_tokenizer(tokenizer_dir).config
    cfg = T2IConfig(
        llm=qwen3.Qwen3Config(vocab_size=text_vocab_size(text_tokenizer.path), hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        head_kwargs=dict(ch_target=tok_cfg.z_channels, ch_cond=64, ch_latent=128, depth_latent=1,
                         depth_adanln=1, parallel_num=4, P_mean=-0.8, P_std=0.8),
        tokenizer=tok_cfg)
    model = PackedT2IModel(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1)))
    texts = sample_texts(text_tokenizer, GRIDS)
    S, N, P, z, mul = 3, 4, 4, tok_cfg.z_channels, 2
    spec = packing.RowSpec(seq_len=sum(len(t.text_ids) for t in texts) + P * 8, max_samples=S,
                            max_blocks=N, parallel_num=P)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    tokens = jnp.sign(jax.random.normal(keys[0], (1, S, N * P, z)))
    t_raw = jax.random.normal(keys[1], (mul, 1, S, N))
    noise = jax.random.normal(keys[2], (mul, 1, S, N, P, z))
    dropped = jnp.asarray([[False, True, False]])
    losses = jax.jit(model.losses)

    def run(samples, grids, slot_tokens, slot_t, slot_noise, slot_dropped):
        row = packing.pack_row(samples, grids, spec, patch_side=2)
        batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
        pad = S - len(samples)
        vision, ce, weights = losses(
            params, jnp.pad(slot_tokens, ((0, 0), (0, pad), (0, 0), (0, 0))), batch,
            jnp.pad(slot_t, ((0, 0), (0, 0), (0, pad), (0, 0))),
            jnp.pad(slot_noise, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * 3),
            dropped=jnp.pad(slot_dropped, ((0, 0), (0, pad))))
        seg = row["segment_ids"]
        text = [float(jnp.sum((ce * weights)[0] * (seg == j + 1))) for j in range(len(samples))]
        return np.asarray(vision * row["block_valid"][None, None]), np.asarray(text), \
            [float(jnp.sum(weights[0] * (seg == j + 1))) for j in range(len(samples))]

    packed_vision, packed_text, packed_count = run(texts, GRIDS, tokens, t_raw, noise, dropped)
    uncond_ids = tuple(text_tokenizer.encode(UNCOND_PROMPT))
    for j, (text, grid) in enumerate(zip(texts, GRIDS)):
        if bool(dropped[0, j]):
            text = packing.SampleText(uncond_ids + text.text_ids[-2:], text.block0_ids, 0)
        vision, ce, count = run([text], [grid], tokens[:, j:j + 1], t_raw[:, :, j:j + 1],
                                noise[:, :, j:j + 1], jnp.zeros((1, 1), bool))
        np.testing.assert_allclose(packed_vision[:, :, j], vision[:, :, 0], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(packed_text[j], ce[0], rtol=2e-5, atol=1e-6)
        assert packed_count[j] == count[0] == len(text.text_ids)
        assert np.all(vision[:, :, 0, :grid[0] * grid[1] // P] > 0)


def test_training_layout_matches_sampling(text_tokenizer, tokenizer_dir):
    """Teacher-forcing the pipeline's own samples through the packed forward gives the head
    conditions the pipeline used at every image step (same sequence, positions and masks)."""
    from bitdance_jax.tokenizer.api import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    cfg = T2IConfig(
        llm=qwen3.Qwen3Config(vocab_size=text_vocab_size(text_tokenizer.path), hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        head_kwargs=dict(ch_target=tok.config.z_channels, ch_cond=64, ch_latent=128,
                         depth_latent=1, depth_adanln=1, parallel_num=4),
        tokenizer=tok.config)
    model = PackedT2IModel(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(3)))
    pipe = T2IPipeline(cfg, dict(params, tokenizer=tok.params), text_tokenizer)
    f = cfg.vae_patch_size
    (h, w), P = GRIDS[0], cfg.parallel_num
    bits, trace = pipe.sample_latents(CAPTIONS[7], h * f, w * f, num_sampling_steps=2,
                                      guidance_scale=1.0, seed=4, trace=True)
    texts = sample_texts(text_tokenizer, GRIDS)
    spec = packing.RowSpec(seq_len=len(texts[0].text_ids) + P * 5, max_samples=2,
                            max_blocks=h * w // P, parallel_num=P)
    row = packing.pack_row(texts[:1], GRIDS[:1], spec, patch_side=cfg.patch_side)
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    tokens = patching.patchify(jnp.asarray(bits, jnp.float32), cfg.patch_side)
    tokens = jnp.stack([tokens, jnp.zeros_like(tokens)], axis=1)  # slot 1 empty
    cond, _, _ = jax.jit(model.forward)(params, tokens, batch)
    err = np.abs(np.asarray(cond[0, 0]) - trace.head_cond[:, 0]).max()
    print(f"training vs sampling head conditions: max abs err {err:.2e}")
    np.testing.assert_allclose(np.asarray(cond[0, 0]), trace.head_cond[:, 0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Training through the trainer.

def fixed_batch_loss(trainer, params, batch):
    return float(jax.jit(trainer.task.loss)(params, trainer.frozen, batch,
                                            jax.random.PRNGKey(7), 0)[0])


def test_training_lowers_loss_resumes_and_exports(tokenizer_dir, tmp_path):
    # The final sample grid uses the sampler that the pipeline check below uses too.
    config = tiny_config(tokenizer_dir, **{"sample.prompts": ("a handwritten digit seven",),
                                           "sample.num_images": 2, "sample.cfg_scale": 2.0,
                                           "sample.num_steps": 2})
    mesh = one_device_mesh()
    straight = train.train(config, str(tmp_path / "straight"), mesh=mesh)
    assert straight["step"] == config.num_steps
    with Image.open(straight["samples"]) as grid:
        assert grid.size[0] > 2 * 8 and grid.size[1] > 8
    # Stop halfway, relaunch: the same final params as the uninterrupted run.
    resumed_dir = str(tmp_path / "resumed")
    first = train.train(config, resumed_dir, mesh=mesh, stop_after=4)
    assert first["stopped"] and first["step"] == 4
    resumed = train.train(config, resumed_dir, mesh=mesh)
    assert resumed["start_step"] == 4 and resumed["step"] == config.num_steps

    trainer = train.Trainer(config, str(tmp_path / "straight"), mesh).build(config.num_steps)
    rows = trainer.task.train_source()
    dataset = trainer.task.train_dataset(rows, config.data, global_batch=trainer.global_batch,
                                         num_steps=config.num_steps, seed=config.seed)
    batch = jax.tree.map(jnp.asarray, next(iter(dataset)))
    assert batch["image"].shape[:2] == (2, 3)
    init = nn.unbox(trainer.task.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1 << 20)))
    mngr = checkpoints.make_checkpoint_manager(str(tmp_path / "straight"), config)
    final, _ = checkpoints.restore_checkpoint(mngr, config.num_steps, trainer.abstract_state,
        trainer.state_shardings)
    mngr_r = checkpoints.make_checkpoint_manager(resumed_dir, config)
    final_r, _ = checkpoints.restore_checkpoint(mngr_r, config.num_steps, trainer.abstract_state,
        trainer.state_shardings)
    jax.tree.map(np.testing.assert_array_equal, final["params"], final_r["params"])
    before = fixed_batch_loss(trainer, init, batch)
    after = fixed_batch_loss(trainer, final["params"], batch)
    print(f"fixed-batch loss: {before:.4f} at init -> {after:.4f} after {config.num_steps} steps")
    assert after < 0.8 * before

    pipe = load_t2i(straight["export"])
    assert read_meta(straight["export"])["tokenizer_params"] == \
        fingerprint.tree_digest(load_param_dir(tokenizer_dir)[1])  # its latents' tokenizer
    images = pipe.generate("a handwritten digit seven", 8, 8, num_sampling_steps=2,
                           guidance_scale=2.0, num_images=2, seed=0)
    assert [im.size for im in images] == [(8, 8), (8, 8)]

    # The export also starts another run (config.init_from); a model of other sizes does not.
    meta, exported = load_param_dir(straight["export"])
    init_params = trainer.task.params_from_checkpoint(meta, exported)
    jax.tree.map(np.testing.assert_array_equal, init_params["llm"], exported["llm"])
    wider = tiny_config(tokenizer_dir, **{"llm.intermediate_size": 96,
                                          "init_from": straight["export"]})
    with pytest.raises(ValueError,
                       match=r"does not fit config.llm.*mlp.*\(64, 128\) vs \(64, 96\)"):
        T2ITask(wider, str(tmp_path / "straight")).params_from_checkpoint(meta, exported)


# ---------------------------------------------------------------------------------------
# Bad input.

def write_folder(root, sizes, captions):
    os.makedirs(root, exist_ok=True)
    for name, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(os.path.join(root, name))
    path = os.path.join(root, "captions.jsonl")
    with open(path, "w") as f:
        for name, caption in captions.items():
            f.write(json.dumps({"file": name, "caption": caption}) + "\n")
    return path


def test_folder_source_and_bad_input(tokenizer_dir, tmp_path):
    root = str(tmp_path / "images")
    captions = write_folder(root, {"a.png": (8, 8), "b.png": (8, 16)},
                            {"a.png": "a red cube", "b.png": "a blue ball"})
    source = caption_sources.CaptionFolderSource(root, captions)
    assert [source[i]["caption"] for i in range(2)] == ["a red cube", "a blue ball"]
    np.testing.assert_array_equal(packing.assign_buckets(source, [(8, 16), (8, 8)]), [1, 0])
    with pytest.raises(ValueError, match=r"b.png is 8x16 .*in no resolution bucket"):
        packing.assign_buckets(source, [(8, 8)])
    config = tiny_config(tokenizer_dir, **{"data.source": "folder", "data.path": root,
                                           "data.captions_file": captions})
    with pytest.raises(ValueError, match="in no resolution bucket"):
        T2ITask(config, str(tmp_path / "wd")).train_source()

    # An image without a caption line, and a caption line naming no image.
    with open(captions, "w") as f:
        f.write(json.dumps({"file": "a.png", "caption": "a red cube"}) + "\n")
    with pytest.raises(ValueError, match=r"have no entry in .*b.png"):
        caption_sources.CaptionFolderSource(root, captions)
    with open(captions, "a") as f:
        f.write(json.dumps({"file": "b.png", "caption": "x"}) + "\n")
        f.write(json.dumps({"file": "c.png", "caption": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"names 1 file\(s\) not in .*c.png"):
        caption_sources.CaptionFolderSource(root, captions)
    with open(captions, "w") as f:
        f.write('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1: expected a JSON object"):
        caption_sources.CaptionFolderSource(root, captions)

    # Buckets of two image shapes need the latent cache (one compiled step).
    with pytest.raises(ValueError, match="cache_latents"):
        T2ITask(tiny_config(tokenizer_dir, **{"data.buckets": ((8, 8), (8, 16))}),
                str(tmp_path / "wd2"))
    with pytest.raises(ValueError, match="tokenizer_dir"):
        T2ITask(tiny_config(""), str(tmp_path / "wd3"))
    with pytest.raises(ValueError, match="vocab_size 5 is smaller than the text tokenizer"):
        T2ITask(tiny_config(tokenizer_dir, **{"llm.vocab_size": 5}), str(tmp_path / "wd4"))
    with pytest.raises(ValueError, match="unknown matmul_precision 'exact'"):
        T2ITask(tiny_config(tokenizer_dir, matmul_precision="exact"), str(tmp_path / "wd5"))


def test_truncated_jpeg_in_a_caption_folder_is_skipped(tokenizer_dir, tmp_path, caplog):
    """A truncated JPEG used to end the run with an OSError from the data workers; the class
    folder already skipped such files. Its slot keeps its place with zero loss weights."""
    root = str(tmp_path / "images")
    os.makedirs(root)
    rng = np.random.default_rng(0)
    captions = {f"{k}.jpg": f"a picture number {k}" for k in range(4)}
    for name in captions:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.path.join(root, name))
    for name, keep in (("1.jpg", 0.95), ("2.jpg", 0.2)):   # the scan cut; the header cut too
        with open(os.path.join(root, name), "r+b") as f:
            f.truncate(int(os.path.getsize(os.path.join(root, name)) * keep))
    path = os.path.join(root, "captions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"file": n, "caption": c}) + "\n" for n, c in captions.items())
    config = tiny_config(tokenizer_dir, **{"data.source": "folder", "data.path": root,
                                           "data.captions_file": path,
                                           "data.max_samples_per_row": 3})
    with caplog.at_level("WARNING"):
        rows = T2ITask(config, str(tmp_path / "wd")).train_source()
    assert "skipping unreadable image 2.jpg" in caplog.text   # never planned into a row
    rows.batched(1)
    seen_bad = 0
    for step in range(len(rows.epoch_plan(0))):
        for r in range(rows.global_batch):
            _, records = rows.locate(step)
            with caplog.at_level("WARNING"):
                row = rows.row(step, r)
            for j, record in enumerate(records[r]):
                segment = row["segment_ids"] == j + 1
                assert rows.source.files[record] != "2.jpg"
                bad = rows.source.files[record] == "1.jpg"
                seen_bad += bad
                assert row["slot_valid"][j] == (0.0 if bad else 1.0)
                assert row["block_valid"][j].any() == (not bad)
                assert row["text_weights"][segment].any() == (not bad)
    assert seen_bad and "skipping unreadable image 1.jpg" in caplog.text


def test_matmul_precision_reaches_every_t2i_module(tokenizer_dir, tmp_path):
    model = T2ITask(tiny_config(tokenizer_dir, matmul_precision="highest"), str(tmp_path)).model
    assert model.llm.precision == model.head.precision == model.projector.precision == "highest"


def test_buckets_with_latent_cache(tokenizer_dir, tmp_path):
    """Two image shapes: the latent cache holds each image's latents in patch order, every
    global batch is from one bucket, and all batches have the same shapes."""
    rng = np.random.default_rng(0)
    sizes, captions = {}, {}
    for k in range(8):
        sizes[f"{k}.png"] = (8, 8) if k % 2 else (8, 16)
        captions[f"{k}.png"] = f"a picture number {k}"
    root = str(tmp_path / "images")
    os.makedirs(root)
    for name, (h, w) in sizes.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, name))
    path = os.path.join(root, "captions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"file": n, "caption": c}) + "\n" for n, c in captions.items())
    config = tiny_config(tokenizer_dir, **{
        "data.source": "folder", "data.path": root, "data.captions_file": path,
        "data.buckets": ((8, 8), (8, 16)), "data.cache_latents": True,
        "data.max_samples_per_row": 2})
    task = T2ITask(config, str(tmp_path / "wd"))
    rows = task.train_source()
    assert len(rows) == 4
    dataset = task.train_dataset(rows, config.data, global_batch=2, num_steps=4, seed=config.seed)
    batches = list(dataset)
    assert len({tuple((k, v.shape) for k, v in sorted(b.items())) for b in batches}) == 1
    widths = []
    for b in batches:  # the latent width of every sample of the batch
        valid = b["slot_valid"] > 0
        per_sample = b["token_rc"][..., 1].max(axis=-1)[valid] + 1
        assert len(set(per_sample.tolist())) == 1
        widths.append(int(per_sample[0]))
    assert sorted(widths) == [4, 4, 8, 8]  # two epochs of one batch per bucket
    source = caption_sources.CaptionFolderSource(root, path)
    # The cached latents are the tokenizer's, in patch order, zero-padded to max_blocks * P.
    for i in range(len(source)):
        image = source[i]["image"].astype(np.float32)[None] / 127.5 - 1.0
        bits = patching.patchify(task.tokenizer.encode(image), 2)[0]
        cached = np.asarray(rows.load_sample(i, 0)["latents"])
        np.testing.assert_array_equal(cached[:len(bits)], bits)
        assert not cached[len(bits):].any()
    # The cache is keyed on the tokenizer's params: a retrained one of the same config differs.
    with open(os.path.join(str(tmp_path / "wd"), "latent_cache", "latent_cache.json")) as f:
        assert json.load(f)["tokenizer_params"] == fingerprint.tree_digest(task.tokenizer.params)


def test_tfds_caption_source(tokenizer_dir, monkeypatch):
    """The TFDS option through a stand-in ``tfds.data_source`` (TFDS is not installed here)."""
    import sys
    import types
    records = [{"image": np.full((8, 16, 1), 7, np.uint8), "text": b"a gray bar"},
               {"image": np.zeros((8, 8, 3), np.uint8), "text": "a black square"}]
    calls = []

    def data_source(name, split, data_dir):
        calls.append((name, split, data_dir))
        return records

    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        types.SimpleNamespace(data_source=data_source))
    config = tiny_config(tokenizer_dir, **{"data.source": "tfds", "data.tfds_name": "my_captions",
                                           "data.caption_key": "text"})
    source = caption_sources.make_caption_source(config.data)
    assert calls == [("my_captions", "train", None)]
    assert caption_sources.source_captions(source) == ["a gray bar", "a black square"]
    assert source[0]["image"].shape == (8, 16, 3) and source.size(0) == (8, 16)
    np.testing.assert_array_equal(packing.assign_buckets(source, [(8, 8), (8, 16)]), [1, 0])


# ---------------------------------------------------------------------------------------
# Starting from a plain Hugging Face Qwen3 folder (config.init_from_llm).

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>"]  # Qwen3 has these already


def write_qwen3_folder(path, *, padding_rows, tie):
    """A tiny random Hugging Face Qwen3 (the sizes of ``tiny_config``) with a word-level
    tokenizer.json of the captions' words and Qwen3's chat/vision tokens; its vocabulary is
    ``padding_rows`` larger than the tokenizer (as Qwen3's is). Returns the tokenizer size."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    split = pre_tokenizers.Whitespace()
    words = sorted({w for text in CAPTIONS + ["user assistant"]
                    for w, _ in split.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["[UNK]"] + words + QWEN_SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(QWEN_SPECIALS)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    hf_config = transformers.Qwen3Config(
        vocab_size=len(vocab) + padding_rows, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        max_position_embeddings=512)
    torch.manual_seed(1)
    hf = transformers.Qwen3ForCausalLM(hf_config)
    with torch.no_grad():  # random weights everywhere (HF initialises norms to exactly 1)
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf.save_pretrained(path, safe_serialization=True)
    return len(vocab)


def folder_params(path):
    """The folder's weights in the Flax layout (the porting convention)."""
    from bitdance_jax.porting import convention
    config = qwen3.Qwen3Config.from_json(path)
    state = convention.load_safetensors(os.path.join(path, "model.safetensors"))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return convention.convert_state_dict(state, qwen3.abstract_qwen3_params(config))


def test_training_from_a_plain_qwen3_folder(tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer
    from bitdance_jax.data.word_tokenizer import special_tokens
    folder = str(tmp_path / "qwen3")
    n_tok = write_qwen3_folder(folder, padding_rows=3, tie=False)
    v0 = n_tok + 3
    config = tiny_config(tokenizer_dir, **{"init_from_llm": folder, "num_steps": 2,
                                           "log_every": 1, "checkpoint.every_steps": 2})
    workdir = str(tmp_path / "run")
    mesh = one_device_mesh()
    trainer = train.Trainer(config, workdir, mesh).build(config.num_steps)
    task = trainer.task

    # The extended tokenizer: the folder's tokens keep their ids, the vision tokens exist.
    extended = Tokenizer.from_file(os.path.join(workdir, "text_tokenizer", "tokenizer.json"))
    original = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    assert all(extended.token_to_id(t) == i for t, i in original.get_vocab().items())
    wanted = special_tokens(max_latent_side=4, parallel_num=4)  # 8x8 images: 4x4 latents
    assert all(task.text_tokenizer.has_token(t) for t in wanted)
    new_ids = sorted(extended.token_to_id(t) for t in wanted if original.token_to_id(t) is None)
    assert new_ids == list(range(n_tok, n_tok + 7))  # res_1..4, query_1..3; 3 in the padding
    assert task.text_tokenizer.token_id("<|vision_start|>") == original.token_to_id(
        "<|vision_start|>")  # reused, not added
    vocab = task.model_config.llm.vocab_size
    assert vocab == n_tok + 7 and vocab > v0

    # Step 0: every LLM weight is the folder's but the new rows (their mean); the projector
    # and head are what a fresh run starts from.
    state = jax.device_get(trainer.init_state(task.pretrained_params()))
    want = folder_params(folder)
    got = state["params"]["llm"]
    new = np.zeros(vocab, bool)
    new[new_ids] = True
    new[v0:] = True
    old = np.flatnonzero(~new[:v0])
    embed, head = got["model"]["embed_tokens"]["embedding"], got["lm_head"]["kernel"]
    want_embed = want["model"]["embed_tokens"]["embedding"]
    want_head = want["lm_head"]["kernel"]
    np.testing.assert_array_equal(embed[old], want_embed[old])
    np.testing.assert_array_equal(head[:, old], want_head[:, old])
    np.testing.assert_allclose(embed[new], np.broadcast_to(want_embed[old].mean(0),
                                                           (new.sum(), 64)), rtol=1e-6)
    np.testing.assert_allclose(head[:, new], np.broadcast_to(want_head[:, old].mean(1)[:, None],
                                                             (64, new.sum())), rtol=1e-6)
    rest = lambda p: {k: v for k, v in p["model"].items() if k != "embed_tokens"}
    jax.tree.map(np.testing.assert_array_equal, rest(got), rest(want))
    fresh = nn.unbox(jax.jit(task.init)(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                                           1 << 20)))
    for part in ("head", "projector"):
        jax.tree.map(np.testing.assert_array_equal, state["params"][part], fresh[part])

    # Two steps of training from there: finite loss, LLM weights moved by about lr at most.
    summary = train.train(config, workdir, mesh=mesh)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
    _, exported = load_param_dir(summary["export"])
    moved = np.abs(exported["llm"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
                   - want["model"]["layers_0"]["mlp"]["up_proj"]["kernel"])
    assert 0 < moved.max() < 3 * config.optim.lr
    assert np.abs(exported["llm"]["lm_head"]["kernel"][:, old] - want_head[:, old]).max() \
        < 3 * config.optim.lr

    # A folder with tied embeddings: the LM head starts from the embedding.
    tied = str(tmp_path / "tied")
    write_qwen3_folder(tied, padding_rows=0, tie=True)
    tied_task = T2ITask(tiny_config(tokenizer_dir, **{"init_from_llm": tied}),
                        str(tmp_path / "run_tied"))
    llm = tied_task.pretrained_params()["llm"]
    np.testing.assert_array_equal(llm["lm_head"]["kernel"][:, :n_tok],
                                  llm["model"]["embed_tokens"]["embedding"][:n_tok].T)

    # config.llm must describe the folder's architecture; init_from and text_tokenizer clash.
    with pytest.raises(ValueError, match=r"config.llm does not match .*config.json: "
                                         r"set intermediate_size=128 \(config.llm has 96\)"):
        T2ITask(tiny_config(tokenizer_dir, **{"init_from_llm": folder,
                                              "llm.intermediate_size": 96}), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not both"):
        T2ITask(tiny_config(tokenizer_dir, **{"init_from_llm": folder,
                                              "init_from": summary["export"]}), str(tmp_path / "y"))
    with pytest.raises(ValueError, match=r"vocab_size 4 is smaller than the vocabulary"):
        T2ITask(tiny_config(tokenizer_dir, **{"init_from_llm": folder, "llm.vocab_size": 4}),
                str(tmp_path / "z"))

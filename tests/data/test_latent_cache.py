"""The class-conditional latent cache: its layout (centre crop first, random crops, flips), the
per-epoch draw of a cached crop, the late decay to the centre crop, the single-crop warning and
the rejection of a cache built with other settings.

A stand-in encoder (2x2-pooled brightness signs) replaces the frozen tokenizer, so the file is fast.
"""
import json
import logging
import os

import numpy as np
import pytest

from bitdance_jax.configs.common import data_config
from bitdance_jax.data import latent_cache, sources
from bitdance_jax.data import pipeline as data_lib
from bitdance_jax.data.augment import center_crop

SIZE = 16


def encode(images):
    """uint8 [B, H, W, 3] -> {-1, +1} [B, H/2, W/2, 3]."""
    b, h, w, c = images.shape
    x = images.astype(np.float32).reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    return np.where(x > 127, 1.0, -1.0)


class Noise:
    """Labelled random images of varied sizes (every crop of one looks different)."""

    def __init__(self, n=12):
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (int(rng.integers(24, 48)), int(rng.integers(24, 48)),
                                             3), dtype=np.uint8) for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i % 10}


def build(cache_dir, source, **kw):
    kw = {"with_flips": True, "crops": 4, "min_crop_frac": 0.5, "tokenizer_digest": "sha256:pool",
          **kw}
    return latent_cache.build_class_cache(source, encode, str(cache_dir), image_size=SIZE,
                                          num_classes=10, tokenizer_config={"name": "pooling"},
                                          chunk=5, **kw)


def draws(cached, epochs, **kw):
    """(crop, flip) of every record in every epoch, read back from the batches' latents."""
    n = len(cached)
    records = data_lib.TrainRecords(cached, global_batch=n, num_steps=epochs, seed=3,
                                    process_index=0, process_count=1, image_size=None, **kw)
    out = np.zeros((epochs, n, 2), int)
    for i in range(len(records)):
        epoch, index = records.locate(i)
        lat = records[i]["latents"]
        variants = cached[index]["latents"]
        hits = [(c, f) for c in range(variants.shape[0]) for f in range(variants.shape[1])
                if np.array_equal(variants[c, f], lat)]
        assert len(hits) == 1
        out[epoch, index] = hits[0]
    return out


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cache") / "c", Noise())


def test_centre_crop_first_then_distinct_random_crops(cached):
    source = Noise()
    assert cached.num_crops == 4 and cached.num_flips == 2
    assert cached.latents.shape == (12, 8, 8, 8, 3) and cached.latents.dtype == np.int8
    assert cached.meta["crops"] == {"count": 4, "seed": latent_cache.CROP_SEED,
                                    "min_crop_frac": 0.5}
    for i in range(len(source)):
        lat = cached[i]["latents"]
        assert lat.shape == (4, 2, 8, 8, 3) and cached[i]["label"] == i % 10
        centre = center_crop(source[i]["image"], SIZE)
        np.testing.assert_array_equal(lat[0, 0], encode(centre[None])[0])
        np.testing.assert_array_equal(lat[0, 1], encode(centre[None, :, ::-1])[0])
        for k in range(1, 4):
            crop = latent_cache.crop_variant(source[i]["image"], SIZE, i, k, min_crop_frac=0.5)
            np.testing.assert_array_equal(lat[k, 0], encode(crop[None])[0])
            np.testing.assert_array_equal(lat[k, 1], encode(crop[None, :, ::-1])[0])
        # Every crop (and flip) is a different latent.
        flat = lat.reshape(8, -1)
        assert len({v.tobytes() for v in flat}) == 8, i
    # A crop is seeded by (record, crop index) only.
    image = source[3]["image"]
    crop = latent_cache.crop_variant(image, SIZE, 3, 2, min_crop_frac=0.5)
    np.testing.assert_array_equal(crop, latent_cache.crop_variant(image, SIZE, 3, 2,
                                                                  min_crop_frac=0.5))
    for record, k in ((3, 1), (4, 2)):
        assert not np.array_equal(crop, latent_cache.crop_variant(image, SIZE, record, k,
                                                                  min_crop_frac=0.5))


def test_epoch_draw_is_deterministic_and_covers_the_crops(cached):
    seen = draws(cached, 8, random_flip=True)
    np.testing.assert_array_equal(seen, draws(cached, 8, random_flip=True))
    crops_per_record = [len(set(seen[:, r, 0])) for r in range(len(cached))]
    assert min(crops_per_record) >= 2 and np.mean(crops_per_record) >= 3
    assert set(seen[..., 1].ravel()) == {0, 1}  # both mirrors are drawn
    # A record's draw changes from epoch to epoch.
    assert any(not np.array_equal(seen[0, r], seen[1, r]) for r in range(len(cached)))
    # Without random_flip only the unmirrored latents are used.
    assert set(draws(cached, 4, random_flip=False)[..., 1].ravel()) == {0}


def test_late_decay_ends_on_the_centre_crop(cached):
    seen = draws(cached, 8, random_flip=True, aug_decay_start_epoch=2, aug_decay_end_epoch=5)
    assert len(set(seen[:2, :, 0].ravel())) == 4      # before the decay: all crops
    assert set(seen[5:, :, 0].ravel()) == {0}          # after it: the centre crop ...
    assert set(seen[5:, :, 1].ravel()) == {0, 1}       # ... and its mirror


def test_single_crop_cache_keeps_the_old_layout_and_draw(tmp_path):
    source = sources.DigitsSource(SIZE)
    few = [source[i] for i in range(40)]
    cached = build(tmp_path / "c", few, crops=1, min_crop_frac=1.0)
    assert cached.latents.shape == (40, 2, 8, 8, 3)
    assert cached.meta["crops"] == {"count": 1, "seed": latent_cache.CROP_SEED,
                                    "min_crop_frac": None}
    rec = sources.make_source(data_config(source="latent_cache", cache_dir=str(tmp_path / "c")))[3]
    np.testing.assert_array_equal(rec["latents"][0, 0], encode(source[3]["image"][None])[0])
    np.testing.assert_array_equal(rec["latents"][0, 1],
                                  encode(source[3]["image"][None, :, ::-1])[0])
    seen = draws(cached, 2, random_flip=True)
    assert set(seen[..., 0].ravel()) == {0} and set(seen[..., 1].ravel()) == {0, 1}


def test_cache_built_with_other_settings_is_rejected(tmp_path):
    few = Noise(6)
    build(tmp_path / "c", few, crops=2)
    for other, diff in [({"crops": 3}, "crops.count: 2 -> 3"),
                        ({"crops": 2, "min_crop_frac": 0.7}, "crops.min_crop_frac: 0.5 -> 0.7"),
                        ({"crops": 2, "with_flips": False}, "with_flips: true -> false"),
                        # a retrained tokenizer of the same config
                        ({"crops": 2, "tokenizer_digest": "sha256:new"},
                         'tokenizer_params: "sha256:pool" -> "sha256:new"')]:
        with pytest.raises(ValueError, match="built for other records, sizes, crops") as e:
            build(tmp_path / "c", few, **other)
        assert diff in str(e.value)
    with pytest.raises(ValueError, match="needs random crops"):
        build(tmp_path / "d", few, crops=2, min_crop_frac=1.0)
    with pytest.raises(ValueError, match="not a latent cache"):
        latent_cache.LatentCacheSource(str(tmp_path))


def _zero_tokenizer(dst, offset=0.0):
    """A tiny tokenizer directory (constant params) and its params digest."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from bitdance_jax.checkpointing import fingerprint
    from bitdance_jax.tokenizer.api import save_tokenizer
    from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig

    cfg = TokenizerConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=3, num_codebooks=1)
    shapes = jax.eval_shape(BinaryAutoencoder(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, SIZE, SIZE, 3)))["params"]  # only its sizes matter here
    params = jax.tree.map(lambda a: np.full(a.shape, offset, a.dtype), nn.unbox(shapes))
    return (save_tokenizer(str(dst), cfg, params, overwrite=True),
            fingerprint.tree_digest(params))


def _task(tmp_path, tok_dir, **data):
    from bitdance_jax.configs.common import base_config
    from bitdance_jax.train.tasks.c2i import BitDanceTask
    c = base_config("bitdance")
    c.tokenizer_dir = tok_dir
    c.model.num_classes = 10
    c.data.update(dict(image_size=SIZE, **data))
    return BitDanceTask(c, str(tmp_path))


def test_single_crop_cache_warns_once(tmp_path, caplog):
    """The trainer's source: a one-crop cache with random crops configured warns, once."""

    tok_dir, digest = _zero_tokenizer(tmp_path / "tok")
    build(tmp_path / "one", Noise(6), crops=1, min_crop_frac=1.0, tokenizer_digest=digest)
    build(tmp_path / "four", Noise(6), crops=4, min_crop_frac=0.5, tokenizer_digest=digest)

    def messages(cache, min_crop_frac):
        task = _task(tmp_path, tok_dir, source="latent_cache", cache_dir=str(tmp_path / cache),
                     min_crop_frac=min_crop_frac, random_flip=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bitdance_jax"):
            task.train_source()
        return [r.getMessage() for r in caplog.records if "single crop" in r.getMessage()]

    assert len(messages("one", 0.8)) == 1
    assert messages("one", 1.0) == []   # no random crops asked for: nothing lost
    assert messages("four", 0.5) == []


def test_cache_of_a_retrained_tokenizer_is_refused(tmp_path, monkeypatch, caplog):
    """The cache is keyed on the tokenizer's params, not only its config: retraining it (same
    config, new weights) at ``tokenizer_dir`` must not reuse the old latents, whether the task
    builds the cache (``cache_latents``) or is given it (``source='latent_cache'``)."""
    from bitdance_jax.train.tasks import c2i as c2i_task
    monkeypatch.setattr(c2i_task, "make_source", lambda c: Noise(6))
    tok_dir, digest = _zero_tokenizer(tmp_path / "tok")
    cache = str(tmp_path / "cache")
    built = _task(tmp_path, tok_dir, cache_latents=True, cache_dir=cache).train_source()
    assert built.meta["tokenizer_params"] == digest
    _, new_digest = _zero_tokenizer(tmp_path / "tok", offset=0.5)   # retrained in place
    with pytest.raises(ValueError, match="tokenizer_params: .* -> "):
        _task(tmp_path, tok_dir, cache_latents=True, cache_dir=cache).train_source()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=f"encoded by another tokenizer \\({digest}\\) than "
                                         f"{tok_dir} \\({new_digest}\\)"):
        _task(tmp_path, tok_dir, source="latent_cache", cache_dir=cache).train_source()
    # A cache from before digests were recorded cannot be checked: it is used, with a warning.
    meta_path = os.path.join(cache, latent_cache.META_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["tokenizer_params"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with caplog.at_level(logging.WARNING, logger="bitdance_jax"):
        _task(tmp_path, tok_dir, source="latent_cache", cache_dir=cache).train_source()
    assert "records no tokenizer digest" in caplog.text


def test_a_folder_that_is_not_a_cache_is_never_emptied(tmp_path):
    """data.cache_dir pointing at a user's folder: refused, its files untouched; an empty folder
    (or a missing one) becomes the cache."""
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty folder that is not a latent cache"):
        build(user, Noise(4), crops=1, min_crop_frac=1.0)
    assert sorted(os.listdir(user)) == ["precious.txt", "sub"]
    assert (user / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        build(tmp_path / "file", Noise(4), crops=1, min_crop_frac=1.0)
    (tmp_path / "empty").mkdir()
    assert len(build(tmp_path / "empty", Noise(4), crops=1, min_crop_frac=1.0)) == 4

"""Input pipelines on small real files: PNG folder (with an unreadable file), a tiny TFDS
ArrayRecord build, digits; process-count invariance and iterator state (the latent cache:
test_latent_cache.py)."""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from bitdance_jax.data import sources
from bitdance_jax.data import pipeline as data_lib
from bitdance_jax.parallel import sharding
from bitdance_jax.configs.common import data_config

CLASSES = ("n01", "n02", "n03")


def write_folder(root, per_class=4, broken=None):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"img_{i}.png"))
    if broken:
        with open(os.path.join(root, CLASSES[0], broken), "wb") as f:
            f.write(b"this is not an image")
    with open(os.path.join(root, CLASSES[1], "notes.txt"), "w") as f:
        f.write("ignored: not an image extension")
    return root


def batches(source, cfg, *, global_batch, num_steps, seed=0, process_index=0, process_count=1):
    ds = data_lib.make_train_dataset(source, cfg, global_batch=global_batch, num_steps=num_steps,
                                     seed=seed, process_index=process_index,
                                     process_count=process_count)
    return list(ds)


def test_image_folder_layout_and_augmentation(tmp_path):
    root = write_folder(str(tmp_path / "train"))
    source = sources.ImageFolderSource(root)
    assert source.classes == list(CLASSES) and len(source) == 12
    assert list(source.labels) == [0] * 4 + [1] * 4 + [2] * 4
    cfg = data_config(source="folder", path=root, image_size=16, min_crop_frac=0.8, random_flip=True,
                      num_threads=1)
    out = batches(source, cfg, global_batch=4, num_steps=6)
    assert len(out) == 6
    for b in out:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8
        np.testing.assert_array_equal(b["label"], source.labels[b["index"]])
    # Every epoch (3 steps of 4) visits every record once; epochs are shuffled differently.
    epochs = [np.concatenate([b["index"] for b in out[k:k + 3]]) for k in (0, 3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    # Augmentation is seeded per (epoch, record): the same record differs between epochs.
    pos0 = {int(i): k for k, i in enumerate(np.concatenate([b["index"] for b in out[:3]]))}
    imgs0 = np.concatenate([b["image"] for b in out[:3]])
    imgs1 = np.concatenate([b["image"] for b in out[3:]])
    pos1 = {int(i): k for k, i in enumerate(epochs[1])}
    assert any(not np.array_equal(imgs0[pos0[r]], imgs1[pos1[r]]) for r in range(12))


def test_hidden_folders_are_not_classes(tmp_path):
    """A notebook's ``.ipynb_checkpoints`` used to become class 0 and shift every label."""
    root = write_folder(str(tmp_path / "train"))
    for hidden in (os.path.join(root, ".ipynb_checkpoints"), os.path.join(root, CLASSES[0], ".cache")):
        os.makedirs(hidden)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(hidden, "copy.png"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, CLASSES[1], ".hidden.png"))
    source = sources.ImageFolderSource(root)
    assert source.classes == list(CLASSES) and len(source) == 12
    assert list(source.labels) == [0] * 4 + [1] * 4 + [2] * 4


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog):
    root = write_folder(str(tmp_path / "train"), broken="img_broken.png")
    source = sources.ImageFolderSource(root)
    broken = source.files.index(os.path.join(root, CLASSES[0], "img_broken.png"))
    cfg = data_config(source="folder", path=root, image_size=16, num_threads=1)
    records = data_lib.TrainRecords(source, global_batch=13, num_steps=1, seed=0, process_index=0,
                                    process_count=1, image_size=16)
    with caplog.at_level(logging.WARNING, logger="bitdance_jax.data"):
        (batch,) = batches(source, cfg, global_batch=13, num_steps=1)
    assert "img_broken.png" in caplog.text and "skipping unreadable image" in caplog.text
    # The broken record's slot holds the next record instead; the batch keeps its size.
    slot = [k for k in range(13) if records.locate(k)[1] == broken][0]
    assert batch["image"].shape[0] == 13
    assert batch["index"][slot] == (broken + 1) % len(source)


def test_all_unreadable_stops_with_a_clear_error(tmp_path):
    root = tmp_path / "train" / "a"
    root.mkdir(parents=True)
    for i in range(sources.MAX_UNREADABLE_IN_A_ROW + 1):
        (root / f"bad{i}.jpg").write_bytes(b"garbage")
    source = sources.ImageFolderSource(str(tmp_path / "train"))
    cfg = data_config(source="folder", image_size=8, num_threads=1)
    with pytest.raises(ValueError, match="unreadable records in a row"):
        batches(source, cfg, global_batch=2, num_steps=1)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sources.ImageFolderSource(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        sources.ImageFolderSource(str(tmp_path / "flat"))
    (tmp_path / "flat" / "a").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        sources.ImageFolderSource(str(tmp_path / "flat"))


@pytest.mark.parametrize("process_count", [2, 4])
def test_same_global_batch_whatever_the_process_count(tmp_path, process_count):
    root = write_folder(str(tmp_path / "train"))
    source = sources.ImageFolderSource(root)
    cfg = data_config(source="folder", image_size=12, min_crop_frac=0.8, random_flip=True,
                      num_threads=1)
    single = batches(source, cfg, global_batch=8, num_steps=3, seed=5)
    per_process = [batches(source, cfg, global_batch=8, num_steps=3, seed=5, process_index=p,
                           process_count=process_count) for p in range(process_count)]
    for step, whole in enumerate(single):
        for key in ("image", "label", "index"):
            joined = np.concatenate([per_process[p][step][key] for p in range(process_count)])
            np.testing.assert_array_equal(joined, whole[key])


def test_iterator_state_restores_the_stream():
    source = sources.DigitsSource(8)
    cfg = data_config(image_size=8, num_threads=2)
    ds = data_lib.make_train_dataset(source, cfg, global_batch=16, num_steps=10, seed=1,
                                     process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_digits_source():
    source = sources.DigitsSource(32)
    assert len(source) == 1797 and source.num_classes == 10
    rec = source[5]
    assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
    assert rec["image"].max() > 200 and 0 <= rec["label"] < 10


def test_tfds_array_record_source(tmp_path):
    import tensorflow_datasets as tfds
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(6)]

    class BitdanceTestTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, p in enumerate(pixels):  # encoded PNG: building needs no TensorFlow
                buf = io.BytesIO()
                Image.fromarray(p).save(buf, format="PNG")
                buf.seek(0)
                yield i, {"image": buf, "label": i % 3}

    BitdanceTestTiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.make_source(data_config(source="tfds", tfds_name="bitdance_test_tiny",
                                              path=str(tmp_path), image_size=16))
    assert len(source) == 6 and source.num_classes == 3
    labels = sorted(int(source[i]["label"]) for i in range(6))
    assert labels == [0, 0, 1, 1, 2, 2]
    found = [source[i]["image"] for i in range(6)]
    assert all(any(np.array_equal(f, p) for p in pixels) for f in found)
    (batch,) = batches(source, data_config(source="tfds", image_size=16, num_threads=1),
                       global_batch=6, num_steps=1)
    assert batch["image"].shape == (6, 16, 16, 3)


def test_global_arrays_from_process_local_data():
    mesh = sharding.make_mesh((4, 2, 1))
    local = {"image": np.arange(8 * 4 * 4 * 3, dtype=np.uint8).reshape(8, 4, 4, 3),
             "label": np.arange(8, dtype=np.int32)}
    out = data_lib.to_global_arrays(local, lambda nd: sharding.batch_sharding(mesh, nd))
    assert out["image"].shape == (8, 4, 4, 3)
    assert out["image"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out["label"]), local["label"])


def test_batch_larger_than_data_set():
    with pytest.raises(ValueError, match="larger than the data set"):
        data_lib.TrainRecords(sources.DigitsSource(8), global_batch=4096, num_steps=1, seed=0,
                              process_index=0, process_count=1, image_size=8)


def test_multiprocess_prefetch_gives_the_same_stream_and_resumes():
    source = sources.DigitsSource(8)
    plain = batches(source, data_config(image_size=8, num_threads=1), global_batch=16, num_steps=4)
    ds = data_lib.make_train_dataset(source, data_config(image_size=8, num_threads=1, worker_count=2),
                                     global_batch=16, num_steps=4, seed=0, process_index=0,
                                     process_count=1)
    it = iter(ds)
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    got += [next(it) for _ in range(2)]
    it.close()
    for want, have in zip(plain, got):
        np.testing.assert_array_equal(have["index"], want["index"])
        np.testing.assert_array_equal(have["image"], want["image"])
    it2 = iter(ds)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["index"], plain[2]["index"])
    it2.close()

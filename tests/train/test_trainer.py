"""Trainer: mesh invariance of one step, exact resume (stop, SIGTERM), NaN stop, bad input.

Everything runs a tiny tokenizer on 8x8 digits so the whole file stays fast on 2 CPU cores.
"""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitdance_jax.data import sources
from bitdance_jax.data import pipeline as data_lib
from bitdance_jax.parallel import sharding
from bitdance_jax.train import checkpoints, cli
from bitdance_jax.train import trainer as train
from bitdance_jax.train.tasks import KINDS
from bitdance_jax.train.tasks.tokenizer import TokenizerTask
from bitdance_jax.configs.common import base_config, tokenizer_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]


def tiny_config(**kw):
    c = base_config("tokenizer")
    c.tokenizer = tokenizer_config(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=8,
                                   num_codebooks=2)
    c.data.image_size = 8
    c.data.num_threads = 1
    c.global_batch_size = 8
    c.num_steps = 6
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.decay_start = 3
    c.optim.ema_decay = 0.9
    c.log_every = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.update_from_flattened_dict(kw)
    return c


def params_of(workdir, config):
    """Params and EMA of the latest checkpoint in ``workdir``."""
    trainer = train.Trainer(config, workdir, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    trainer.build(config.num_steps)
    mngr = checkpoints.make_checkpoint_manager(workdir, config)
    state, data_state = checkpoints.restore_checkpoint(mngr, mngr.latest_step(), trainer.abstract_state,
        trainer.state_shardings)
    mngr.close()
    return jax.device_get(state), data_state


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 1)]


def test_one_step_same_on_every_mesh():
    # eps 1e-4: a param whose gradient is only float noise (e.g. a bias right before a norm)
    # would otherwise move by +-lr in Adam's first step, with a mesh-dependent sign.
    config = tiny_config(**{"optim.warmup_steps": 0, "optim.eps": 1e-4})
    source = sources.make_source(config.data)
    local = next(iter(data_lib.make_train_dataset(source, config.data, global_batch=8,
                                                  num_steps=1, seed=0)))
    one = train.Trainer(config, "/x", sharding.make_mesh((1, 1, 1), jax.devices()[:1])).build(6)
    init_params = jax.device_get(one.init_state()["params"])
    results = {}
    for shape in MESHES:
        devices = jax.devices()[:int(np.prod(shape))]
        trainer = train.Trainer(config, "/nonexistent", sharding.make_mesh(shape, devices)).build(6)
        state = trainer.init_state(init_params)
        batch = trainer.to_device(local)
        with jax.set_mesh(trainer.mesh):
            new_state, metrics = trainer.compile_step(batch)(state, trainer.frozen, batch)
        results[shape] = (float(metrics["loss"]), jax.device_get(new_state["params"]),
                          float(metrics["grad_norm"]))
        if shape == (2, 2, 2):  # params really are split over the tensor axis
            kernel = new_state["params"]["encoder"]["conv_in"]["kernel"]
            assert kernel.sharding.spec[-1] == "tensor"
    ref_loss, ref_params, ref_gnorm = results[(1, 1, 1)]
    for shape, (loss, params, gnorm) in results.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(shape))
        np.testing.assert_allclose(gnorm, ref_gnorm, rtol=1e-4, err_msg=str(shape))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                             atol=0.01 * config.optim.lr,
                                                             err_msg=str(shape)),
                     params, ref_params)
    # The step did change the params (the comparison is not vacuous).
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref_params, init_params)
    assert max(jax.tree.leaves(diff)) > 0.5 * config.optim.lr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    config = tiny_config()
    seen = []
    summary = train.train(config, workdir, on_step=lambda s, b: seen.append(b["index"].copy()))
    assert summary["step"] == config.num_steps
    state, data_state = params_of(workdir, config)
    return config, state, data_state, seen, summary


def test_run_writes_samples_export_and_tensorboard(uninterrupted):
    config, _, _, _, summary = uninterrupted
    assert os.path.isfile(summary["samples"])
    assert os.path.isfile(os.path.join(summary["export"], "bitdance.json"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(summary["workdir"], "tb")))
    for key in ("loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "tokens_per_s"):
        assert np.isfinite(summary["metrics"][key])
    from bitdance_jax.tokenizer.api import load_tokenizer
    tok = load_tokenizer(summary["export"])
    size, f = config.data.image_size, tok.downsample_factor
    assert tok.encode(np.zeros((1, size, size, 3), np.float32)).shape == (
        1, size // f, size // f, config.tokenizer.z_channels)


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    config, full_state, full_data, full_seen, _ = uninterrupted
    workdir = str(tmp_path)
    seen = []
    record = lambda s, b: seen.append(b["index"].copy())
    first = train.train(config, workdir, stop_after=3, on_step=record)
    assert first["step"] == 3 and first["stopped"]
    train.train(config, workdir, on_step=record)
    state, data_state = params_of(workdir, config)
    assert_trees_equal(state["params"], full_state["params"])
    assert_trees_equal(state["ema"], full_state["ema"])
    assert_trees_equal(state["opt_state"], full_state["opt_state"])
    assert int(state["step"]) == config.num_steps and data_state == full_data
    np.testing.assert_array_equal(np.stack(seen), np.stack(full_seen))  # same data order


def test_sigterm_saves_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    config, full_state, _, full_seen, _ = uninterrupted
    workdir = str(tmp_path)
    seen = []

    def record(step, batch):
        seen.append(batch["index"].copy())
        if step == 3:  # a real SIGTERM, delivered to this process mid-run
            os.kill(os.getpid(), signal.SIGTERM)

    first = train.train(config, workdir, on_step=record)
    assert first["preempted"] and first["step"] == 3
    mngr = checkpoints.make_checkpoint_manager(workdir, config)
    assert mngr.latest_step() == 3  # saved although 3 is not a multiple of every_steps
    mngr.close()
    train.train(config, workdir, on_step=lambda s, b: seen.append(b["index"].copy()))
    state, _ = params_of(workdir, config)
    assert_trees_equal(state["params"], full_state["params"])
    np.testing.assert_array_equal(np.stack(seen), np.stack(full_seen))


def test_nan_loss_stops_with_step_and_keeps_last_good_state(uninterrupted, tmp_path, monkeypatch):
    config, _, _, _, _ = uninterrupted
    bad_step = 4  # 1-based: the 4th step's batch poisons the loss
    _, rows = data_lib.global_rows(bad_step - 1, config.global_batch_size, 1797, config.seed)
    poison = int(rows[0])
    real_loss = TokenizerTask.loss

    def poisoned(self, params, frozen, batch, rng, step):
        loss, aux = real_loss(self, params, frozen, batch, rng, step)
        return jnp.where(jnp.any(batch["index"] == poison), jnp.nan, loss), aux

    monkeypatch.setattr(TokenizerTask, "loss", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=f"step {bad_step}"):
        train.train(config, str(tmp_path))
    # Reference: the same (poisoned) program stopped before the bad step.
    ref_dir = str(tmp_path / "ref")
    train.train(config, ref_dir, stop_after=bad_step - 1)
    mngr = checkpoints.make_checkpoint_manager(str(tmp_path), config)
    assert mngr.latest_step() == bad_step - 1
    mngr.close()
    state, data_state = params_of(str(tmp_path), config)
    assert int(state["step"]) == bad_step - 1 and bool(state["ok"])
    ref, ref_data = params_of(ref_dir, config)
    assert_trees_equal(state["params"], ref["params"])
    assert data_state == ref_data


def test_unknown_config_field_is_rejected(tmp_path):
    cfg = os.path.join(REPO, "configs", "digits_tokenizer.py")
    with pytest.raises(ValueError, match=r"unknown config field 'config\.optim\.learning_rat'"):
        cli.parse_args(["train", "--config", cfg, "--workdir", str(tmp_path),
                          "--config.optim.learning_rat=1e-3"])
    with pytest.raises(ValueError, match=r"unknown config field 'config\.nope'"):
        cli.parse_args(["train", f"--config={cfg}", "--workdir", str(tmp_path), "--config.nope=1"])
    assert cli.main(["train", "--config", cfg, "--workdir", str(tmp_path), "--config.nope=1"]) == 2
    config, workdir, _ = cli.parse_args(["train", "--config", cfg, "--workdir", str(tmp_path),
                                           "--config.optim.lr=0.5", "--config.mesh=(2,2,2)"])
    assert config.optim.lr == 0.5 and tuple(config.mesh) == (2, 2, 2) and workdir == str(tmp_path)
    assert not os.listdir(tmp_path)  # nothing written for a rejected command


@pytest.mark.parametrize("override, message", [
    ("--config.log_every=0", "config.log_every must be a whole number of steps >= 1, got 0"),
    ("--config.sample_every=-5", "config.sample_every must be a whole number of steps >= 0")])
def test_step_intervals_are_checked_before_the_run(tmp_path, capsys, override, message):
    """``log_every=0`` used to end the run with a ZeroDivisionError traceback."""
    cfg = os.path.join(REPO, "configs", "digits_tokenizer.py")
    assert cli.main(["train", "--config", cfg, "--workdir", str(tmp_path), override]) == 2
    assert message in capsys.readouterr().err


def test_batch_not_divisible_by_data_axis():
    config = tiny_config(global_batch_size=12)
    with pytest.raises(ValueError, match="not divisible by the data axis"):
        train.Trainer(config, "/nonexistent", sharding.make_mesh((8, 1, 1)))
    config = tiny_config(global_batch_size=0, per_device_batch_size=3)
    assert train.Trainer(config, "/x", sharding.make_mesh((4, 1, 2))).global_batch == 24


def test_schedule_and_weight_decay_mask():
    from bitdance_jax.train import optimizer as optim
    sched = optim.lr_schedule(1.0, warmup_steps=10, decay_start=20, total_steps=30, min_lr=0.1)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 19, 20, 25, 30)],
                               [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1], rtol=1e-6)
    params = {"proj_in": {"w1": {"kernel": jnp.ones((2, 2))}}, "cls_embedding": {"embedding": jnp.ones((3, 2))},
              "query_token": jnp.ones((1, 2, 2)), "layers_0": {"wqkv": {"kernel": jnp.ones((2, 6)),
                                                                       "bias": jnp.ones((6,))}},
              "norm": {"scale": jnp.ones((2,))}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"proj_in": {"w1": {"kernel": False}}, "cls_embedding": {"embedding": False},
                    "query_token": False, "layers_0": {"wqkv": {"kernel": True, "bias": False}},
                    "norm": {"scale": False}}


def tiny_bitdance_config(tmp_path):
    """A tiny BitDance over an untrained tiny tokenizer (8x8 images -> 4x4 grid of 8 bits)."""
    from flax import linen as nn
    from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig
    from bitdance_jax.tokenizer.api import save_tokenizer
    tok = TokenizerConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, num_codebooks=2)
    params = nn.unbox(BinaryAutoencoder(tok).init(jax.random.PRNGKey(1),
                                                  np.zeros((1, 8, 8, 3), np.float32))["params"])
    c = base_config("bitdance")
    c.tokenizer_dir = save_tokenizer(str(tmp_path / "tok"), tok, params)
    c.model.update(dict(dim=64, n_layer=1, n_head=4, diff_layers=1, diff_dim=64,
                        diff_adanln_layers=1, num_classes=10, parallel_num=4, cls_token_num=2,
                        diff_batch_mul=2))
    c.data.image_size = 8
    c.data.num_threads = 1
    c.global_batch_size = 8
    c.num_steps = 4
    c.optim.update(dict(lr=1e-3, warmup_steps=0, eps=1e-4))
    return c


def test_bitdance_step_same_on_fsdp_tensor_mesh(tmp_path):
    """The AR model (embed dims FSDP-sharded, heads/MLP over tensor), latents encoded by the
    frozen tokenizer inside the step: one step on (2,2,2) equals one step on 1 device."""
    config = tiny_bitdance_config(tmp_path)
    source = sources.make_source(config.data)
    local = next(iter(data_lib.make_train_dataset(source, config.data, global_batch=8,
                                                  num_steps=1, seed=0)))
    init_params = None
    results = {}
    for shape in [(1, 1, 1), (2, 2, 2)]:
        devices = jax.devices()[:int(np.prod(shape))]
        trainer = train.Trainer(config, str(tmp_path), sharding.make_mesh(shape, devices)).build(4)
        state = trainer.init_state(init_params)
        init_params = jax.device_get(state["params"])
        batch = trainer.to_device(local)
        with jax.set_mesh(trainer.mesh):
            new_state, metrics = trainer.compile_step(batch)(state, trainer.frozen, batch)
        if shape == (2, 2, 2):
            specs = [s.spec for s in jax.tree.leaves(trainer.param_shardings)]
            assert any("fsdp" in tuple(spec) for spec in specs)
            assert any("tensor" in tuple(spec) for spec in specs)
        results[shape] = (float(metrics["loss"]), jax.device_get(new_state["params"]))
    (loss_a, params_a), (loss_b, params_b) = results[(1, 1, 1)], results[(2, 2, 2)]
    assert np.isfinite(loss_a)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=0.01 * 1e-3),
                 params_a, params_b)


def test_digits_score_separates_right_from_wrong_labels():
    from bitdance_jax.evaluation.digits_score import score_samples
    real = sources.DigitsSource(32)
    idx = np.random.default_rng(0).choice(len(real), 200, replace=False)
    right = score_samples(real.images[idx], real.labels[idx])
    wrong = score_samples(real.images[idx], (real.labels[idx] + 1) % 10)
    assert right["score"] > 0.95 and wrong["score"] < 0.05
    with pytest.raises(ValueError, match="images for"):
        score_samples(real.images[:3], real.labels[:2])


def test_init_from_a_trained_directory(uninterrupted, tmp_path):
    """A trained/ported param directory initialises a new run; a mismatched one is refused."""
    from bitdance_jax.checkpointing.param_dir import load_param_dir
    config, _, _, _, summary = uninterrupted
    meta, loaded = load_param_dir(summary["export"])
    trainer = train.Trainer(config, str(tmp_path), sharding.make_mesh((2, 1, 4))).build(6)
    state = jax.device_get(trainer.init_state(trainer.task.params_from_checkpoint(meta, loaded)))
    assert_trees_equal(state["params"], loaded)
    assert_trees_equal(state["ema"], loaded)
    bigger = tiny_config(**{"tokenizer.z_channels": 16})
    other = train.Trainer(bigger, str(tmp_path), sharding.make_mesh((8, 1, 1))).build(6)
    with pytest.raises(ValueError, match="has shape"):
        other.init_state(loaded)
    del loaded["encoder"]["conv_in"]
    with pytest.raises(ValueError, match="lack encoder/conv_in/kernel"):
        trainer.init_state(loaded)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from bitdance_jax.train import trainer as train
from test_trainer import tiny_config

def hard_kill(step, batch):
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no final save: a crash

train.train(tiny_config(), {workdir!r}, on_step=hard_kill)
"""


def test_hard_kill_and_relaunch_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL mid-run (an async checkpoint may be in flight); the relaunch resumes from the
    last complete checkpoint and reaches the uninterrupted run's params and data order."""
    import subprocess
    import sys
    config, full_state, full_data, full_seen, _ = uninterrupted
    workdir = str(tmp_path / "run")
    script = KILLED_RUN.format(repo=REPO, tests=os.path.dirname(os.path.abspath(__file__)), kill_at=5,
                               workdir=workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    mngr = checkpoints.make_checkpoint_manager(workdir, config)
    killed_at = mngr.latest_step()
    mngr.close()
    assert killed_at is not None and killed_at < config.num_steps
    seen = []
    train.train(config, workdir, on_step=lambda s, b: seen.append(b["index"].copy()))
    state, data_state = params_of(workdir, config)
    assert_trees_equal(state["params"], full_state["params"])
    assert_trees_equal(state["opt_state"], full_state["opt_state"])
    assert data_state == full_data
    np.testing.assert_array_equal(np.stack(seen), np.stack(full_seen[killed_at:]))


TRAINING_CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                          if f.endswith(".py") and f not in ("__init__.py", "common.py",
                                                             "bitdance_models.py"))
IMAGENET_RUNS = ["B,1", "B,4", "B,16", "L,1", "H,1"]  # the released models


@pytest.mark.parametrize("name", TRAINING_CONFIGS + [f"imagenet_bitdance.py:{a}" for a in IMAGENET_RUNS])
def test_every_config_loads(name, tmp_path):
    config, _, _ = cli.parse_args(["train", "--config", os.path.join(REPO, "configs", name),
                                   "--workdir", str(tmp_path)])
    assert config.kind in KINDS
    if name.startswith("imagenet_bitdance.py:"):
        from bitdance_jax.c2i.config import BitDanceConfig, released_name
        from bitdance_jax.train.tasks.c2i import architecture_fields
        size, par = name.split(":")[1].split(",")
        arch = BitDanceConfig(**architecture_fields(config.model), latent_dim=32, grid_size=16)
        assert released_name(arch) == f"BitDance-{size}-{par}x"  # the released model
        assert config.global_batch_size == 1024 and config.epochs == 800
        assert config.loss.bit_flip_rate == (0.1 if size == "B" else 0.05)
        assert (config.optim.lr, config.optim.b1, config.optim.b2) == (6e-4, 0.9, 0.95)


def test_imagenet_config_rejects_an_unreleased_argument(tmp_path):
    with pytest.raises(cli.UsageError, match="SIZE,PARALLEL"):
        cli.parse_args(["train", "--config", os.path.join(REPO, "configs", "imagenet_bitdance.py:X,2"),
                        "--workdir", str(tmp_path)])


def test_default_pipeline_overrides_reach_the_stages(tmp_path):
    config, _, _ = cli.parse_args(["train", "--config", os.path.join(REPO, "configs", "default.py"),
                                     "--workdir", str(tmp_path), "--config.bitdance.num_steps=7",
                                     "--config.tokenizer.optim.lr=0.01"])
    assert config.stages == ("tokenizer", "bitdance")
    assert config.bitdance.num_steps == 7 and config.tokenizer.optim.lr == 0.01
    assert config.bitdance.model.parallel_num == 4 and config.bitdance.loss.label_drop > 0


def finished_copy(uninterrupted, tmp_path):
    """A copy of the finished run's workdir (relaunches must not touch the shared one)."""
    import shutil
    config, _, _, _, summary = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(summary["workdir"], workdir)
    return config, workdir


def test_resume_refuses_a_config_that_breaks_exact_resume(uninterrupted, tmp_path, caplog):
    """Issue 19 case 8: global_batch_size 8 -> 16 used to resume without a word and overwrite
    config.json. Now: refused (config.json untouched) unless --allow_config_change; settings
    that do not change the batches or the math (log_every) only warn; the old config is kept."""
    import logging
    config, workdir = finished_copy(uninterrupted, tmp_path)
    saved = open(os.path.join(workdir, "config.json")).read()
    bigger = tiny_config(global_batch_size=16)
    with pytest.raises(ValueError, match=r"break exact resume \(global_batch_size: 8 -> 16\)"):
        train.train(bigger, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == saved
    cfg = os.path.join(REPO, "configs", "digits_tokenizer.py")
    argv = ["train", "--config", cfg, "--workdir", workdir, "--config.global_batch_size=16"]
    assert cli.parse_args(argv + ["--allow_config_change"])[2]["allow_config_change"].value
    assert not cli.parse_args(argv)[2]["allow_config_change"].value
    with caplog.at_level(logging.WARNING, logger="bitdance_jax.train"):
        summary = train.train(tiny_config(log_every=3), workdir)
    assert summary["start_step"] == config.num_steps
    assert "changed settings: log_every: 2 -> 3" in caplog.text
    assert open(os.path.join(workdir, "config.previous-1.json")).read() == saved
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitdance_jax.train"):
        train.train(bigger, workdir, allow_config_change=True)
    assert "changed config (--allow_config_change): global_batch_size: 8 -> 16" in caplog.text
    assert os.path.exists(os.path.join(workdir, "config.previous-2.json"))


def test_resume_with_another_worker_count_is_a_clear_error(uninterrupted, tmp_path):
    """Issue 19 case 9: changing data.worker_count between runs ended in a bare
    ``KeyError: 'exhausted'`` from Grain; the saved iterator state only fits its worker count,
    so the relaunch is refused, override or not, with the value to use."""
    _, workdir = finished_copy(uninterrupted, tmp_path)
    for allow in (False, True):
        with pytest.raises(ValueError, match=r"data\.worker_count changed from 0 to 2 .* "
                                             r"--config\.data\.worker_count=0"):
            train.train(tiny_config(**{"data.worker_count": 2}), workdir,
                        allow_config_change=allow)

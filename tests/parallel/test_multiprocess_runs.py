"""The real programs on 2 local processes x 2 CPU devices (tools/launch_local.py), against
1 process x 4 devices where two runs are compared.

* a tokenizer -> BitDance pipeline (class latent cache, sample grids, exports, digits score):
  finishes (the export used to run on process 0 alone and hang in Orbax's sync), and its
  losses and final params match the 1 x 4 run;
* SIGKILL of one process (the launcher stops the other), a relaunch, SIGTERM to the launcher
  (both processes save at the same step), a relaunch through SLURM variables: the final params
  are bit-identical to the uninterrupted 2 x 2 run;
* T2I training on packed rows (packed-row latent cache, word tokenizer built once), then the
  t2i command line generating a prompt set split over 2 processes from the export;
* ``python -m bitdance_jax.sample --npz`` over 2 processes (stopped after a chunk and resumed):
  the same bytes as 1 process.

Every launch runs under a hard timeout (a hang fails the test), and the children get short
heartbeat/shutdown timeouts. The children share a persistent compilation cache, written by
every process (tests/parallel/cache_site), so relaunches do not compile again.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(REPO, "tests", "parallel")
LAUNCHER = os.path.join(REPO, "tools", "launch_local.py")
TRAIN = os.path.join(HERE, "mp_train.py")
CONFIGS = os.path.join(HERE, "mp_configs.py")
CACHE_SITE = os.path.join(HERE, "cache_site")

TRAIN_TIMEOUT = 900   # seconds: a launch still running then is a hang
SMALL_TIMEOUT = 300
TOKENIZER_STEPS = 6   # mp_configs.tokenizer().num_steps


class Run:
    """A subprocess (in its own process group) writing its output to a file."""

    def __init__(self, name, argv, env, log, timeout):
        self.name, self.argv, self.log, self.timeout = name, argv, str(log), timeout
        self.t0 = time.monotonic()
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self):
        """(returncode, output, seconds); a run past its timeout is killed and fails the test."""
        left = self.timeout - (time.monotonic() - self.t0)
        try:
            rc = self.proc.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.name} still running after {self.timeout} s (a hang):\n"
                        + self.output()[-6000:])
        seconds = time.monotonic() - self.t0
        print(f"{self.name}: exit {rc} after {seconds:.1f} s")
        return rc, self.output(), seconds

    def output(self):
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\r", "\n")


def child_env(cache_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join([CACHE_SITE, REPO]), JAX_PLATFORMS="cpu",
               BITDANCE_HEARTBEAT_TIMEOUT_S="10", BITDANCE_SHUTDOWN_TIMEOUT_S="30",
               BITDANCE_INIT_TIMEOUT_S="120", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               BITDANCE_TEST_CACHE_EVERY_PROCESS="1")
    env.update(extra)
    return env


def launch(name, command, env, log_dir, *, slurm=False, timeout=TRAIN_TIMEOUT):
    """``command`` on 2 processes x 2 devices."""
    argv = [sys.executable, LAUNCHER, "-n", "2", "--devices-per-process", "2"]
    argv += ["--slurm"] if slurm else []
    return Run(name, argv + ["--"] + command, env, os.path.join(log_dir, f"{name}.log"), timeout)


def single(name, command, env, log_dir, *, timeout=TRAIN_TIMEOUT):
    """``command`` in 1 process x 4 devices."""
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return Run(name, command, env, os.path.join(log_dir, f"{name}.log"), timeout)


def train_cmd(kind, workdir, *overrides):
    return [sys.executable, TRAIN, "--config", f"{CONFIGS}:{kind}", "--workdir", str(workdir),
            *overrides]


def final_state(workdir):
    """(step, host copy of the train state) of the latest checkpoint in ``workdir``."""
    import orbax.checkpoint as ocp
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    path = os.path.join(directory, str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              tree)
        return step, jax.device_get(ckptr.restore(path, target))


def export_params(path):
    from bitdance_jax.checkpointing.param_dir import load_param_dir
    return load_param_dir(path)[1]


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def launches(workdir, process):
    with open(os.path.join(workdir, f"launches.{process}.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(stage_dir, process):
    with open(os.path.join(stage_dir, f"losses.{process}.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------
# Uninterrupted runs: the pipeline on 1 x 4 and 2 x 2, T2I on 2 x 2 (all at once).

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    env = child_env(root / "jax_cache")
    tok_dir = random_tokenizer(str(root / "random_tokenizer"))
    runs = {
        "pipeline_1x4": single("pipeline_1x4", train_cmd("pipeline", root / "one"), env, root),
        "pipeline_2x2": launch("pipeline_2x2", train_cmd("pipeline", root / "two"), env, root),
        "t2i_2x2": launch("t2i_2x2", train_cmd("t2i", root / "t2i",
                                               f"--config.tokenizer_dir={tok_dir}"), env, root),
    }
    results = {name: run.wait() for name, run in runs.items()}
    return root, env, results


def random_tokenizer(dst):
    """The T2I run's frozen tokenizer (untrained: the T2I run need not wait for the pipeline)."""
    from flax import linen as nn
    from bitdance_jax.tokenizer.api import save_tokenizer
    from bitdance_jax.tokenizer.model import BinaryAutoencoder, TokenizerConfig
    config = TokenizerConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8,
                             num_codebooks=2)
    params = BinaryAutoencoder(config).init(jax.random.PRNGKey(0),
                                            np.zeros((1, 8, 8, 3), np.float32))["params"]
    return save_tokenizer(dst, config, jax.device_get(nn.unbox(params)))


def test_export_on_every_process_finishes(trained):
    """The reported hang: after training, only process 0 exported, so it waited forever in
    Orbax's sync while process 1 waited in shutdown. Now every process exports (process 0
    alone writes the metadata and renames), and the run ends with complete exports."""
    root, _, results = trained
    rc, out, seconds = results["pipeline_2x2"]
    assert rc == 0, out[-6000:]
    for stage in ("tokenizer", "bitdance"):
        stage_dir = root / "two" / stage
        assert sorted(os.listdir(stage_dir / "export")) == ["bitdance.json", "params"]
        assert not os.path.exists(str(stage_dir / "export") + ".partial")
        assert (stage_dir / "samples" / "final.png").is_file()  # by process 0
        assert (stage_dir / "summary.json").is_file()
        for process in (0, 1):  # both processes left train() with the final step
            assert launches(root / "two", process)[-1][stage]["step"] == \
                json.load(open(stage_dir / "summary.json"))["step"]
    # the class latent cache, built by process 0 while process 1 waited
    assert (root / "two" / "bitdance" / "latent_cache" / "latent_cache.json").is_file()
    assert json.load(open(root / "two" / "score.json"))["num_samples"] == 4
    print(f"2 x 2 pipeline (tokenizer, BitDance, exports, grids, score): {seconds:.1f} s")


def test_two_processes_train_like_one(trained):
    """Same global batch on 2 x 2 and 1 x 4: the same loss log and final state. Not bit for
    bit: XLA's in-process all-reduce and gloo's cross-process one sum the gradients of the 4
    data shards in different orders, so the losses first differ in the last bits at step 3.
    The tokenizer's sign quantizer turns those last bits into a few visibly different gradient
    entries (straight-through codes that sit near 0), so its Adam moments are compared at
    rtol 1e-3 / atol 1e-4 (seen: 4.8e-4 relative, 3e-5 absolute); everything else, and all of
    BitDance's state (params within 2e-8 here), at rtol 1e-4 / atol 2e-5."""
    root, _, results = trained
    for name in ("pipeline_1x4", "pipeline_2x2"):
        assert results[name][0] == 0, results[name][1][-6000:]
    report = []
    for stage in ("tokenizer", "bitdance"):
        one, two = root / "one" / stage, root / "two" / stage
        assert losses(two, 0) == losses(two, 1)  # both processes see the same metrics
        np.testing.assert_allclose(losses(two, 0), losses(one, 0), rtol=2e-5, err_msg=stage)
        (step_one, state_one), (step_two, state_two) = final_state(one), final_state(two)
        assert step_one == step_two
        bitwise = leaves_equal(state_one, state_two)
        for part in ("params", "ema", "opt_state"):
            rtol, atol = (1e-3, 1e-4) if (stage, part) == ("tokenizer", "opt_state") else (1e-4, 2e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(
                b, a, rtol=rtol, atol=atol, err_msg=f"{stage} {part}"),
                state_one[part], state_two[part])
        diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - b)))
                   for a, b in zip(jax.tree.leaves(state_one["params"]),
                                   jax.tree.leaves(state_two["params"])))
        report.append(f"{stage}: bitwise={bitwise}, max |params diff| = {diff:.2e}")
    print("2 x 2 vs 1 x 4: " + "; ".join(report))


# ---------------------------------------------------------------------------------------
# Interrupted: SIGKILL of one process, SIGTERM to the launcher, a relaunch through SLURM.

@pytest.fixture(scope="module")
def interrupted(trained):
    root, env, _ = trained
    workdir = root / "kill"
    cmd = train_cmd("tokenizer", workdir)
    kill = launch("kill_process_1", cmd, dict(env, MP_KILL="1:3"), root).wait()
    after_kill = final_state(workdir)[0] if os.path.isdir(workdir / "checkpoints") else None
    term = launch("sigterm_launcher", cmd, dict(env, MP_TERM_LAUNCHER="0:3"), root).wait()
    slurm = launch("slurm_relaunch", cmd, env, root, slurm=True).wait()
    return root, workdir, kill, after_kill, term, slurm


def test_sigkill_of_one_process_stops_the_other(interrupted):
    _, workdir, (rc, out, seconds), after_kill, _, _ = interrupted
    assert rc == 128 + signal.SIGKILL, out[-6000:]
    assert "launch_local: process 1 died: killed by SIGKILL" in out
    assert "launch_local: exit 137 (process 1: killed by SIGKILL)" in out
    # killed after a checkpoint was complete: the relaunch resumed from it
    assert after_kill is not None and after_kill < TOKENIZER_STEPS
    first_relaunch = launches(workdir, 0)[0]
    assert first_relaunch["start_step"] == after_kill
    print(f"SIGKILL run: {seconds:.1f} s, checkpoint at step {after_kill}")


def test_sigterm_to_the_launcher_saves_on_every_process(interrupted):
    _, workdir, _, after_kill, (rc, out, seconds), _ = interrupted
    assert rc == 0, out[-6000:]
    assert "launch_local: forwarding SIGTERM to every process" in out
    ends = [launches(workdir, p)[0] for p in (0, 1)]
    assert all(e["preempted"] and e["stopped"] for e in ends), ends
    step = ends[0]["step"]
    assert ends[1]["step"] == step and after_kill < step < TOKENIZER_STEPS
    for p in (0, 1):
        assert any(line.startswith(f"[{p}]") and f"preempted: saved step {step}" in line
                   for line in out.splitlines()), p
    print(f"SIGTERM run: {seconds:.1f} s, both processes saved step {step}")


def test_slurm_relaunch_resumes_exactly(interrupted, trained):
    """The third launch goes through SLURM_* variables (no flags); it resumes from the
    preempted step, and the run, killed once and preempted once, ends with the same state
    and export, bit for bit, as the uninterrupted 2 x 2 run."""
    root, workdir, _, _, term, (rc, out, seconds) = interrupted
    assert rc == 0, out[-6000:]
    preempted_at = launches(workdir, 0)[0]["step"]
    for p in (0, 1):
        last = launches(workdir, p)[-1]
        assert last["start_step"] == preempted_at and last["step"] == TOKENIZER_STEPS
    reference = root / "two" / "tokenizer"
    (step, state), (ref_step, ref_state) = final_state(workdir), final_state(reference)
    assert step == ref_step == TOKENIZER_STEPS
    for part in ("params", "ema", "opt_state", "rng"):
        assert leaves_equal(state[part], ref_state[part]), part
    assert leaves_equal(export_params(workdir / "export"), export_params(reference / "export"))
    print(f"SLURM relaunch: {seconds:.1f} s, resumed from step {preempted_at}")


# ---------------------------------------------------------------------------------------
# T2I, and sampling from the exports.

def test_t2i_two_processes_export_generates(trained, tmp_path):
    root, env, results = trained
    rc, out, seconds = results["t2i_2x2"]
    assert rc == 0, out[-6000:]
    workdir = root / "t2i"
    assert (workdir / "text_tokenizer" / "tokenizer.json").is_file()  # built once
    assert (workdir / "latent_cache" / "latent_cache.json").is_file()
    assert sorted(os.listdir(workdir / "export")) == ["bitdance.json", "params", "tokenizer.json"]
    assert launches(workdir, 0)[-1]["step"] == launches(workdir, 1)[-1]["step"] == 4
    # The export, loaded with load_t2i by each of 2 processes, each generating its share.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit three\na handwritten digit seven\n")
    out_dir = tmp_path / "images"
    cmd = [sys.executable, "-m", "bitdance_jax.t2i", "--ckpt", str(workdir / "export"),
           "--prompts-file", str(prompts), "--out-dir", str(out_dir), "--height", "8",
           "--width", "8", "--steps", "2", "--guidance-scale", "2"]
    rc2, out2, seconds2 = launch("t2i_cli_2x2", cmd, env, root, timeout=SMALL_TIMEOUT).wait()
    assert rc2 == 0, out2[-6000:]
    images = sorted(os.listdir(out_dir))   # and the run manifest, written once
    assert images == [".bitdance_run.json", "00000.png", "00001.png"], images
    assert '[0] {"images": 1' in out2 and '[1] {"images": 1' in out2  # one prompt each
    print(f"T2I 2 x 2 training: {seconds:.1f} s; t2i CLI over 2 processes: {seconds2:.1f} s")


def test_sample_npz_two_processes_same_bytes(trained):
    """``sample --npz`` from the BitDance export: 1 x 4, and 2 x 2 stopped after one chunk
    then resumed (5 samples in chunks of 4: the last chunk is padded)."""
    root, env, results = trained
    assert results["pipeline_2x2"][0] == 0
    export = str(root / "two" / "bitdance" / "export")
    common = [sys.executable, "-m", "bitdance_jax.sample", "--ckpt", export, "--num-samples",
              "5", "--batch-size", "4", "--steps", "2", "--cfg-scale", "2"]
    one_npz, two_npz = str(root / "one.npz"), str(root / "two.npz")
    one = single("sample_1x4", common + ["--npz", one_npz], env, root, timeout=SMALL_TIMEOUT)
    part = launch("sample_2x2_part", common + ["--npz", two_npz, "--max-chunks", "1"], env,
                  root, timeout=SMALL_TIMEOUT)
    rc_one, out_one, s_one = one.wait()
    rc_part, out_part, s_part = part.wait()
    assert rc_one == 0, out_one[-4000:]
    assert rc_part == 0, out_part[-4000:]
    assert "[0] stopped after 1 chunk(s)" in out_part and not os.path.exists(two_npz)
    assert sorted(os.listdir(two_npz + ".parts")) == ["chunk_000000.npy", "run.json"]
    rc, out, s_rest = launch("sample_2x2_resume", common + ["--npz", two_npz], env, root,
                             timeout=SMALL_TIMEOUT).wait()
    assert rc == 0, out[-4000:]
    with open(one_npz, "rb") as a, open(two_npz, "rb") as b:
        assert a.read() == b.read()
    assert np.load(two_npz)["arr_0"].shape == (5, 8, 8, 3)
    assert not os.path.exists(two_npz + ".parts")
    print(f"sample --npz: 1 x 4 {s_one:.1f} s, 2 x 2 {s_part:.1f} + {s_rest:.1f} s")

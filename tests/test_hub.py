"""hf:owner/name[/file][@revision] -> ported directory, through a local Hub cache built in
huggingface_hub's own layout from the golden fixtures. No network: HF_HUB_OFFLINE=1, and the
online paths run against a patched huggingface_hub with HF_ENDPOINT pointing nowhere."""
import json
import os

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from huggingface_hub import errors as hf_errors

import golden
import hub_cache
from bitdance_jax import hub, load_model, load_tokenizer, port_imagenet_checkpoint
from bitdance_jax.t2i.pipeline import load_t2i

C2I = {"checkpoint.pt": golden.path("ar_parallel", "checkpoint.pt")}
MULTI = {"ar_1x.pt": golden.path("ar_1x", "checkpoint.pt"),
         "ar_parallel.pt": golden.path("ar_parallel", "checkpoint.pt"),
         "ae.pt": golden.path("tokenizer", "ae.pt")}
T2I_FILES = sorted(os.listdir(golden.path("t2i_model")))


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("hf_home"))
    commits = {
        "tiny/c2i": hub_cache.add_snapshot(home, "tiny/c2i", {**C2I, "README.md": b"# c2i\n"}),
        "tiny/multi": hub_cache.add_snapshot(home, "tiny/multi", MULTI),
        "tiny/t2i": hub_cache.add_folder(home, "tiny/t2i", golden.path("t2i_model")),
        "tiny/ae": hub_cache.add_folder(home, "tiny/ae", golden.path("gan_decoder")),
        "tiny/readme": hub_cache.add_snapshot(home, "tiny/readme", {"README.md": b"hello"}),
        # the t2i folder of an interrupted download: one file never arrived
        "tiny/t2i-partial": hub_cache.add_snapshot(
            home, "tiny/t2i-partial", {f: golden.path("t2i_model", f) for f in T2I_FILES
                                       if f != "vision_head.safetensors"}),
    }
    bogus = os.path.join(home, "weights.pt")
    torch.save({"weights": {}}, bogus)
    commits["tiny/bogus"] = hub_cache.add_snapshot(home, "tiny/bogus", {"weights.pt": bogus})
    return home, commits


@pytest.fixture
def env(hf_home, tmp_path, monkeypatch):
    """Offline Hub cache of the module, fresh port cache per test."""
    home, commits = hf_home
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # never the real Hub
    monkeypatch.setenv("BITDANCE_JAX_CACHE", str(tmp_path / "bd_cache"))
    return commits


def _complete_dirs(root):
    """Directories under ``root`` that a loader would take for a finished port."""
    return sorted(d for d, _, files in os.walk(root) if "bitdance.json" in files
                  and os.path.basename(d).startswith(".") is False
                  and ".tmp-" not in d)


def _same_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plain_paths_unchanged(tmp_path):
    assert hub.resolve(str(tmp_path)) == str(tmp_path)
    assert hub.resolve(tmp_path) == str(tmp_path)
    assert hub.parse("hf:o/n/sub/f.pt@v1.0") == hub.HubId("o/n", "v1.0", "sub/f.pt")
    assert hub.parse("hf://o/n") == hub.HubId("o/n", None, None)


def test_class_conditional_ported_once_then_read(env, tmp_path, monkeypatch):
    commit = env["tiny/c2i"]
    out = hub.resolve("hf:tiny/c2i")
    assert out == hub.ported_dir(hub.parse("hf:tiny/c2i"), commit)
    assert out.startswith(str(tmp_path / "bd_cache" / "ported" / "tiny--c2i" / commit))
    done = json.loads(open(os.path.join(out, hub.DONE_FILE)).read())
    assert done["commit"] == commit and done["source"] == "checkpoint.pt"
    model = load_model(out)
    ref = port_imagenet_checkpoint(C2I["checkpoint.pt"], str(tmp_path / "direct"))
    _same_params(model.params, load_model(ref).params)
    assert model.config.num_classes == golden.case("ar_parallel")["config"]["model_kwargs"]["num_classes"]

    # later loads read the port: no porting, no snapshot_download, by branch or by commit
    def boom(*a, **k):
        raise AssertionError("must not port or download again")
    monkeypatch.setattr(hub, "_port", boom)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    assert hub.resolve("hf:tiny/c2i") == out
    assert hub.resolve(f"hf:tiny/c2i@{commit}") == out
    # ... even once the Hub cache is gone (the branch is remembered next to the port)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    assert hub.resolve("hf:tiny/c2i") == out


def test_repo_with_several_files_and_tokenizers(env):
    commit = env["tiny/multi"]
    with pytest.raises(hub.HubFormatError, match="several models") as e:
        hub.resolve("hf:tiny/multi")
    assert "hf:tiny/multi/ar_1x.pt" in str(e.value) and "hf:tiny/multi/ar_parallel.pt" in str(e.value)
    out = hub.resolve(f"hf:tiny/multi/ar_1x.pt@{commit}")
    assert load_model(out).config.parallel_num == 1
    tok = load_tokenizer(hub.resolve("hf:tiny/multi/ae.pt", num_codebooks=4))
    bits = tok.encode(golden.nchw_to_nhwc(golden.arrays("tokenizer")["images"]))
    golden.check("tokenizer", "quant", np.moveaxis(bits, -1, 1))
    with pytest.raises(hub.HubNotFoundError, match="nothere.pt.*ar_1x.pt"):
        hub.resolve("hf:tiny/multi/nothere.pt")


def test_text_to_image_folder_and_safetensors_tokenizer(env):
    out = hub.resolve("hf:tiny/t2i")
    pipe = load_t2i(out)
    assert pipe.config.llm.hidden_size == json.load(open(golden.path("t2i_model", "config.json")))["hidden_size"]
    assert load_tokenizer(out).config.z_channels == pipe.config.tokenizer.z_channels
    tok = load_tokenizer(hub.resolve("hf:tiny/ae"))
    assert tok.config.gan_decoder


def test_repo_holding_a_ported_directory_is_used_as_is(env, hf_home, tmp_path):
    home, _ = hf_home
    ported = hub._port_function()(golden.path("tokenizer", "ae.pt"), str(tmp_path / "tok"))
    commit = hub_cache.add_folder(home, "tiny/jax-tok", ported)
    out = hub.resolve("hf:tiny/jax-tok")
    assert out.endswith(os.path.join("snapshots", commit))
    assert load_tokenizer(out).config.z_channels == golden.case("tokenizer")["config"]["ddconfig"]["z_channels"]
    assert _complete_dirs(os.environ["BITDANCE_JAX_CACHE"]) == []   # nothing ported


def test_offline_and_not_found_errors(env):
    with pytest.raises(hub.HubOfflineError, match="HF_HUB_OFFLINE"):
        hub.resolve("hf:nobody/missing")
    with pytest.raises(hub.HubOfflineError, match="'v9'.*not in the local Hub cache"):
        hub.resolve("hf:tiny/c2i@v9")
    with pytest.raises(hub.HubOfflineError):
        hub.resolve("hf:tiny/c2i@" + "0" * 40)
    for bad in ("hf:justname", "hf:/x", "hf:o/n@", "hf:o/n/../x"):
        with pytest.raises(hub.HubError):
            hub.resolve(bad)


def _response(status):
    """An HTTP response object of the client this huggingface_hub version uses."""
    url = "http://127.0.0.1:9/api"
    for name in ("httpx2", "httpx"):
        try:
            client = __import__(name)
        except ImportError:
            continue
        return client.Response(status, request=client.Request("GET", url))
    import requests
    r = requests.Response()
    r.status_code, r.url = status, url
    return r


def test_online_errors_are_translated(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def repo_info_raising(exc):
        def repo_info(self, repo_id, **kw):
            raise exc
        return repo_info
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info_raising(
        hf_errors.RepositoryNotFoundError("404", response=_response(404))))
    with pytest.raises(hub.HubNotFoundError, match="no repository 'nobody/missing'"):
        hub.resolve("hf:nobody/missing")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info_raising(
        hf_errors.RevisionNotFoundError("404", response=_response(404))))
    with pytest.raises(hub.HubNotFoundError, match="no revision 'v9'"):
        hub.resolve("hf:tiny/c2i@v9")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info_raising(
        hf_errors.GatedRepoError("403", response=_response(403))))
    with pytest.raises(hub.HubNotFoundError, match="gated"):
        hub.resolve("hf:tiny/gated")
    # no connection: the cache decides; not cached -> says so
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info",
                        repo_info_raising(ConnectionError("no route")))

    def no_network(repo_id, **kw):
        raise hf_errors.LocalEntryNotFoundError("cannot reach the Hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(hub.HubOfflineError, match="cannot be reached"):
        hub.resolve("hf:nobody/missing")


def test_files_that_do_not_match(env):
    with pytest.raises(hub.HubFormatError, match="weights.pt .*does not match.*unknown checkpoint layout"):
        hub.resolve("hf:tiny/bogus")
    with pytest.raises(hub.HubFormatError, match="holds no BitDance checkpoint.*README.md"):
        hub.resolve("hf:tiny/readme")
    with pytest.raises(hub.HubFormatError, match="vision_head.safetensors.*interrupted"):
        hub.resolve("hf:tiny/t2i-partial")
    assert _complete_dirs(os.environ["BITDANCE_JAX_CACHE"]) == []


def test_interrupted_port_leaves_nothing_complete(env, monkeypatch):
    spec = hub.parse("hf:tiny/multi/ar_1x.pt")
    dst = hub.ported_dir(spec, env["tiny/multi"])
    parent = os.path.dirname(dst)
    real_port = hub._port

    def port_then_crash(src, tmp, **kw):   # everything written, then killed before the rename
        real_port(src, tmp, **kw)
        assert os.path.isfile(os.path.join(tmp, "bitdance.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_port", port_then_crash)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve("hf:tiny/multi/ar_1x.pt")
    assert not os.path.exists(dst) and _complete_dirs(os.environ["BITDANCE_JAX_CACHE"]) == []

    def crash_midway(src, tmp, **kw):
        os.makedirs(tmp)
        with open(os.path.join(tmp, "bitdance.json"), "w") as f:
            f.write("{")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(hub, "_port", crash_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        hub.resolve("hf:tiny/multi/ar_1x.pt")
    assert not os.path.exists(dst) and _complete_dirs(os.environ["BITDANCE_JAX_CACHE"]) == []

    # a process killed outright leaves its temporary sibling; it never counts and is cleared
    stale = os.path.join(parent, f".{os.path.basename(dst)}.tmp-killed")
    os.makedirs(stale)
    with open(os.path.join(stale, "bitdance.json"), "w") as f:
        f.write("{}")
    monkeypatch.setattr(hub, "_port", real_port)
    assert hub.resolve("hf:tiny/multi/ar_1x.pt") == dst
    assert not os.path.exists(stale)
    assert load_model(dst).config.parallel_num == 1
    assert _complete_dirs(os.environ["BITDANCE_JAX_CACHE"]) == [dst]


def test_loaders_and_cli_take_hub_ids(env, tmp_path, capsys):
    """``load_model``/``load_tokenizer``/``load_t2i`` and every ``--ckpt`` accept ``hf:`` ids."""
    from bitdance_jax.c2i import cli as sample_cli
    _same_params(load_model("hf:tiny/c2i").params, load_model(hub.resolve("hf:tiny/c2i")).params)
    assert load_tokenizer("hf:tiny/ae").config.gan_decoder
    assert load_t2i("hf:tiny/t2i").config.llm.hidden_size == \
        json.load(open(golden.path("t2i_model", "config.json")))["hidden_size"]
    grid = tmp_path / "grid.png"
    assert sample_cli.main(["--ckpt", "hf:tiny/c2i", "--class-ids", "0,1", "--steps", "2",
                            "--out", str(grid)]) == 0 and grid.is_file()
    assert sample_cli.main(["--ckpt", "hf:tiny/nothere", "--class-ids", "0",
                            "--out", str(grid)]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("revision", ["../..", "/abs/path", "a/../b", ".hidden", "a//b", "x/", "..", "a\\b"])
def test_revisions_that_are_not_ref_names_are_refused(env, revision):
    """A revision becomes a path under both caches: ``@../..`` once read and wrote there."""
    with pytest.raises(hub.HubError, match="not a revision"):
        hub.resolve(f"hf:tiny/c2i@{revision}")


def test_branch_tag_and_pr_revisions_parse():
    for rev in ("main", "v1.0", "refs/pr/1", "release-2026_12", "0" * 40):
        assert hub.parse(f"hf:o/n@{rev}").revision == rev


def test_a_ref_file_that_is_not_a_commit_is_ignored(env, monkeypatch):
    """The refs files are read back as path components: only a commit hash is trusted."""
    refs = os.path.join(hub._repo_dir("nobody/forged"), "refs")
    os.makedirs(refs)
    with open(os.path.join(refs, "main"), "w") as f:
        f.write("../../../elsewhere")
    assert hub._local_commit(hub.parse("hf:nobody/forged")) is None


def test_refused_credentials_and_server_errors(env, monkeypatch):
    """401/403 is an error, never a silent stale cache; a 5xx falls back to the cache with a
    warning; both used to be swallowed by one ``except Exception``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cached = hub.resolve("hf:tiny/c2i")   # port it once (offline lookup of the local refs)

    def repo_info_answering(status):
        def repo_info(self, repo_id, **kw):
            raise hf_errors.HfHubHTTPError(f"HTTP {status}", response=_response(status))
        return repo_info
    for status in (401, 403):
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info_answering(status))
        with pytest.raises(hub.HubError, match=f"refused the credentials \\(HTTP {status}\\)"):
            hub.resolve("hf:tiny/c2i")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info_answering(503))
    with pytest.warns(RuntimeWarning, match="HTTP 503.*cached copy"):
        assert hub.resolve("hf:tiny/c2i") == cached

"""Prompt-set runs: .txt/.json/.jsonl sets, the DPG-Bench and GenEval layouts, per-prompt seeds,
resume after an interruption (and the refusal of a rerun with other settings), and the split
over processes."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import golden
from bitdance_jax.t2i import cli as t2i_cli
from bitdance_jax.t2i import evaluation
from bitdance_jax.t2i.prompts import read_prompts_file

PROMPTS = {"17": "a red cube", "3": "a blue ball", "8": "two green cones"}


def _main(tmp_path, prompts_file, layout, *extra):
    cfg = golden.case("t2i_gen")["config"]
    height, width = cfg["image_size"]
    out_dir = tmp_path / layout
    rc = t2i_cli.main(["--ckpt", golden.path(cfg["model_dir"]), "--prompts-file", str(prompts_file),
                       "--out-dir", str(out_dir), "--layout", layout, "--height", str(height),
                       "--width", str(width), "--steps", "1", "--guidance-scale", "2.0", *extra])
    return rc, out_dir, (height, width)


def _run(tmp_path, prompts_file, layout, *extra):
    rc, out_dir, size = _main(tmp_path, prompts_file, layout, *extra)
    assert rc == 0
    return out_dir, size


def _listdir(path):
    """The layout's files (without the hidden run manifest)."""
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def test_prompt_lines_split_at_newlines_only(tmp_path):
    """``str.splitlines`` also split at U+2028, U+0085 and form feeds inside a prompt, which
    cut it in two and shifted every later id; Windows line ends still work."""
    inside = "a cat\u2028on a mat\x0cwith \x85 a hat"
    (tmp_path / "p.txt").write_text(f"{inside}\r\nsecond\n", encoding="utf-8", newline="")
    assert [(e.id, e.prompt) for e in read_prompts_file(str(tmp_path / "p.txt"))] == \
        [("0", inside), ("1", "second")]
    line = json.dumps({"prompt": inside}, ensure_ascii=False)
    (tmp_path / "p.jsonl").write_text(line + "\n" + json.dumps({"prompt": "b"}) + "\n",
                                      encoding="utf-8")
    assert [e.prompt for e in read_prompts_file(str(tmp_path / "p.jsonl"))] == [inside, "b"]


def test_prompt_sets_in_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("a red cube\n\n  a blue ball \n")
    (tmp_path / "dpg.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "list.json").write_text(json.dumps(["x", {"prompt": "y", "tag": "t"}]))
    lines = [json.dumps({"tag": "single_object", "prompt": p}) for p in PROMPTS.values()]
    (tmp_path / "g.jsonl").write_text("\n".join(lines) + "\n")
    assert [(e.index, e.id, e.prompt) for e in read_prompts_file(str(tmp_path / "a.txt"))] == \
        [(0, "0", "a red cube"), (1, "1", "a blue ball")]
    assert [(e.id, e.prompt) for e in read_prompts_file(str(tmp_path / "dpg.json"))] == \
        list(PROMPTS.items())
    assert [e.prompt for e in read_prompts_file(str(tmp_path / "list.json"))] == ["x", "y"]
    geneval = read_prompts_file(str(tmp_path / "g.jsonl"))
    assert [e.metadata for e in geneval] == [line + "\n" for line in lines]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"tag": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a 'prompt'"):
        read_prompts_file(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prompts_file(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("key", ["../../escaped", "/abs/path", "sub/name", "a\\b", "..", ".hidden",
                                 "", "nul\0"])
def test_prompt_ids_that_are_not_plain_names_are_refused(tmp_path, key):
    """A DPG-Bench id names ``<out_dir>/<id>.png``: a downloaded file must not write elsewhere."""
    (tmp_path / "p.json").write_text(json.dumps({"ok": "a red cube", key: "a blue ball"}))
    with pytest.raises(ValueError, match=r"p.json: prompt id .* ids must be plain file names"):
        read_prompts_file(str(tmp_path / "p.json"))


def test_dpg_layout_resumes_with_the_same_images_and_settings(tmp_path, capsys):
    prompts = tmp_path / "dpg.json"
    prompts.write_text(json.dumps(PROMPTS))
    out_dir, (h, w) = _run(tmp_path, prompts, "dpg", "--num-images", "4", "--batch-size", "2")
    assert _listdir(out_dir) == sorted(f"{k}.png" for k in PROMPTS)
    with Image.open(out_dir / "3.png") as im:
        assert im.size == (2 * w, 2 * h)  # a 2x2 grid, no padding
    before = {k: (out_dir / f"{k}.png").read_bytes() for k in PROMPTS}
    stamp = os.stat(out_dir / "17.png").st_mtime_ns
    os.remove(out_dir / "8.png")  # an interrupted run: one prompt missing
    _run(tmp_path, prompts, "dpg", "--num-images", "4", "--batch-size", "1")
    assert os.stat(out_dir / "17.png").st_mtime_ns == stamp  # done prompts are not redone
    # Prompt i draws from seed + i: the same images whatever the batch it was sampled in.
    assert (out_dir / "8.png").read_bytes() == before["8"]
    assert not [f for f in os.listdir(out_dir) if f.endswith(".partial")]
    # A rerun that would make other images is refused, not mixed with these (nothing sampled).
    for extra, diff in [(("--seed", "1"), "seed: 0 -> 1"), (("--steps", "2"), "steps: 1 -> 2"),
                        (("--guidance-scale", "3"), "guidance_scale: 2.0 -> 3.0"),
                        (("--num-images", "2"), "num_images: 4 -> 2"),
                        (("--param-dtype", "bfloat16"), "params: ")]:
        extra = ("--num-images", "4", *extra) if "--num-images" not in extra else extra
        capsys.readouterr()
        assert _main(tmp_path, prompts, "dpg", *extra)[0] == 1
        assert diff in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**PROMPTS, "3": "a yellow ball"}))
    assert _main(tmp_path, other, "dpg", "--num-images", "4")[0] == 1
    assert "prompts: " in capsys.readouterr().err
    assert (out_dir / "3.png").read_bytes() == before["3"]
    # Images without a manifest are of unknown settings: refused too.
    os.remove(out_dir / evaluation.MANIFEST)
    assert _main(tmp_path, prompts, "dpg", "--num-images", "4")[0] == 1
    assert "unknown settings" in capsys.readouterr().err


def test_geneval_layout(tmp_path):
    lines = [json.dumps({"tag": "single_object", "include": [{"class": "cube", "count": 1}],
                         "prompt": p}) for p in PROMPTS.values()]
    prompts = tmp_path / "meta.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out_dir, (h, w) = _run(tmp_path, prompts, "geneval", "--num-images", "4")
    assert _listdir(out_dir) == ["00000", "00001", "00002"]
    for i, line in enumerate(lines):
        folder = out_dir / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == line + "\n"
        assert sorted(os.listdir(folder / "samples")) == [f"{k:04d}.png" for k in range(4)]
        with Image.open(folder / "grid.png") as grid, Image.open(folder / "samples" / "0000.png") as s:
            assert grid.size == (2 * w, 2 * h) and s.size == (w, h)
            np.testing.assert_array_equal(np.asarray(grid)[:h, :w], np.asarray(s))


def test_processes_take_contiguous_shares_covering_the_set(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(7)))
    entries = read_prompts_file(str(tmp_path / "p.txt"))
    shares = [evaluation.process_share(entries, p, 3) for p in range(3)]
    assert [[e.index for e in s] for s in shares] == [[0, 1, 2], [3, 4, 5], [6]]


class _NoisyDecoderPipe:
    """A stand-in pipeline whose decoder output depends on its seed (as a GAN decoder's)."""
    dtype, precision = np.float32, None
    params = {"w": np.zeros(2, np.float32)}

    def __init__(self, tokenizer_file):
        self.text_tokenizer = SimpleNamespace(path=str(tokenizer_file))

    def sample_latents(self, prompts, height, width, *, num_images, **_):
        return np.zeros((len(prompts) * num_images, 1, 1, 1), np.float32)

    def decode_latents(self, bits, seed=0):
        return np.full((len(bits), 2, 2, 3), seed / 100, np.float32)


def test_a_prompts_decoder_noise_does_not_depend_on_its_batch(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    (tmp_path / "tok.json").write_text("{}")
    entries = read_prompts_file(str(tmp_path / "p.txt"))
    pipe = _NoisyDecoderPipe(tmp_path / "tok.json")
    outputs = []
    for batch in (1, 3):
        args = SimpleNamespace(out_dir=str(tmp_path / f"b{batch}"), layout="flat", num_images=2,
                               seed=5, batch_size=batch, height=2, width=2, steps=1,
                               guidance_scale=1.0)
        t2i_cli.run_prompt_set(pipe, entries, args)
        outputs.append({f: (tmp_path / f"b{batch}" / f).read_bytes()
                        for f in _listdir(tmp_path / f"b{batch}")})
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1]

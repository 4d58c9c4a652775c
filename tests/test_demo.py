"""The Gradio demo in a real browser: `python -m bitdance_jax.demo` serves the golden tiny
class-conditional and text-to-image models (through hf: ids on an offline Hub cache) on
127.0.0.1; headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium)
picks a class and types a prompt, clicks Generate and checks that decoded PNGs of the
models' sizes appear. Without Chromium it skips, with the reason, on a user's machine and
fails under CI (``CI=true``), where .ci/run installs it."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

import golden
import hub_cache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_START_TIMEOUT = 600   # load, port, warm-up compiles on a small CPU
GENERATE_TIMEOUT = 240
T2I_SIZE = tuple(golden.case("t2i_gen")["config"]["image_size"])   # (height, width) of the golden run
T2I_SQUARE = (max(T2I_SIZE),) * 2   # a second size of the list, so the picker has a choice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, n=4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    home = str(root / "hf_home")
    hub_cache.add_snapshot(home, "tiny/c2i", {"checkpoint.pt": golden.path("ar_parallel", "checkpoint.pt")})
    hub_cache.add_folder(home, "tiny/t2i", golden.path("t2i_model"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device
    env.update(HF_HOME=home, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               BITDANCE_JAX_CACHE=str(root / "ported"), GRADIO_TEMP_DIR=str(root / "gradio"),
               GRADIO_ANALYTICS_ENABLED="False", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    log = root / "server.log"
    cmd = [sys.executable, "-m", "bitdance_jax.demo", "--ckpt", "hf:tiny/c2i",
           "--t2i-ckpt", "hf:tiny/t2i", "--host", "127.0.0.1", "--port", str(port),
           "--c2i-steps", "4", "--t2i-steps", "4", "--max-batch", "4",
           "--t2i-sizes", f"{T2I_SIZE[0]}x{T2I_SIZE[1]},{T2I_SQUARE[0]}x{T2I_SQUARE[1]}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() - t0 > SERVER_START_TIMEOUT:
                pytest.fail(f"demo not serving after {SERVER_START_TIMEOUT}s:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        print(f"[demo] serving after {time.monotonic() - t0:.1f}s")
        yield {"url": url, "log": log, "root": root}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(20)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        why = ("the browser test needs Debian's chromium and chromium-driver: "
               "apt-get install -y chromium chromium-driver (.ci/run does this)")
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,1700", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _pick(driver, elem_id, text, expected):
    """Type into a dropdown's filter and take the first match (as a user would)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text)
    WebDriverWait(driver, 30).until(
        lambda d: any(expected == o.get_attribute("aria-label")
                      for o in d.find_elements(By.CSS_SELECTOR, "[role=option]")))
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, 30).until(lambda d: box.get_attribute("value") == expected)


def _click(driver, elem_id, timeout=60):
    """Click like a user, once nothing (page still settling, a toast) covers the button."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    el = driver.find_element(By.ID, elem_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)

    def clicked(d):
        try:
            el.click()
            return True
        except ElementClickInterceptedException:
            return False
    WebDriverWait(driver, timeout, poll_frequency=0.5).until(clicked)


def _status(driver, elem_id) -> str:
    from selenium.webdriver.common.by import By
    els = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    return els[0].get_attribute("value") if els else ""


def _gallery_images(driver, elem_id, n, timeout):
    """Wait for ``n`` loaded images in the gallery; returns their (natural size, src)."""
    from selenium.webdriver.support.ui import WebDriverWait
    js = ("return Array.from(document.querySelectorAll(arguments[0] + ' img'))"
          ".filter(i => i.complete && i.naturalWidth > 0)"
          ".map(i => [i.naturalWidth, i.naturalHeight, i.src]);")
    found = []

    def ready(d):
        found[:] = d.execute_script(js, f"#{elem_id}")
        # thumbnails (and a preview, if open) show the same files
        return len({src for _, _, src in found}) >= n
    WebDriverWait(driver, timeout).until(ready)
    return found


def _fetch_png(src):
    with urllib.request.urlopen(src, timeout=30) as r:
        data = r.read()
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG", im.format
    return im.size


def test_demo_in_headless_chromium(browser, server, tmp_path_factory, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    d = browser
    d.get(server["url"])
    WebDriverWait(d, 120).until(lambda d: d.find_elements(By.ID, "c2i-generate"))
    try:
        # bad input: a message in the page, not a traceback
        _click(d, "t2i-generate")
        WebDriverWait(d, 60).until(lambda d: "prompt is empty" in _status(d, "t2i-status"))
        assert "Traceback" not in d.page_source

        # class-conditional: pick a class by name, generate a batch of 2
        _pick(d, "c2i-class", "digit 7", "7: digit 7")
        batch = d.find_element(By.CSS_SELECTOR, "#c2i-batch input[type=number]")
        batch.clear()
        batch.send_keys("2")
        _click(d, "c2i-generate")
        # text-to-image: a prompt and a size from the list (queued behind the first)
        d.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea").send_keys("a red cube on a table")
        _pick(d, "t2i-size", f"{T2I_SIZE[0]}x{T2I_SIZE[1]}", f"{T2I_SIZE[0]}x{T2I_SIZE[1]}")
        _click(d, "t2i-generate")

        c2i = _gallery_images(d, "c2i-gallery", 2, GENERATE_TIMEOUT)
        WebDriverWait(d, 30).until(lambda d: _status(d, "c2i-status").startswith("done: 2 image"))
        side = golden.case("ar_parallel")["config"]["model_kwargs"]["resolution"] // \
            golden.case("ar_parallel")["config"]["model_kwargs"]["down_size"]   # latent grid x vae factor 1
        assert {(w, h) for w, h, _ in c2i} == {(side, side)}, c2i
        assert _fetch_png(c2i[0][2]) == (side, side)

        t2i = _gallery_images(d, "t2i-gallery", 1, GENERATE_TIMEOUT)
        WebDriverWait(d, 30).until(lambda d: _status(d, "t2i-status").startswith("done: 1 image"))
        assert {(w, h) for w, h, _ in t2i} == {(T2I_SIZE[1], T2I_SIZE[0])}, t2i
        assert _fetch_png(t2i[0][2]) == (T2I_SIZE[1], T2I_SIZE[0])
        assert "Traceback" not in d.page_source
    finally:
        shot = tmp_path_factory.mktemp("screenshots") / "demo.png"
        d.save_screenshot(str(shot))
        with capsys.disabled():
            print(f"\n[demo] screenshot: {shot}")
            print(f"[demo] server log: {server['log']}")
    assert Image.open(shot).format == "PNG"


@pytest.mark.filterwarnings("ignore:.*:UserWarning")   # gr.Warning outside a request
def test_bad_input_becomes_a_message_not_an_exception():
    """The page's handlers on fake models: every bad field is named, nothing raises."""
    import types

    import gradio as gr
    import numpy as np
    from bitdance_jax import demo

    model = types.SimpleNamespace(
        config=types.SimpleNamespace(num_classes=10), default_cfg_scale=1.0, image_size=4,
        sample=lambda ids, **kw: np.zeros((len(ids), 4, 4, 3), np.uint8))
    c2i = demo.ClassConditional(model, demo.class_names(10), steps=[4, 8], max_batch=4)
    assert c2i.labels[7] == "7: digit 7" and c2i.class_id("digit 7") == 7 and c2i.class_id("7: digit 7") == 7
    assert len(c2i.generate("3: digit 3", 1.0, 0, 4, 2)) == 2
    handle = demo._handler(c2i.generate, gr)
    for args, message in [
            (("tiger", 4.0, 0, 4, 2), "unknown class 'tiger'"), (("", 4.0, 0, 4, 2), "no class chosen"),
            (("1", 0.5, 0, 4, 2), "cfg scale must be between"), (("1", 4.0, -1, 4, 2), "seed must be"),
            (("1", 4.0, 1.5, 4, 2), "seed must be a whole number"), (("1", 4.0, None, 4, 2), "seed is empty"),
            (("1", 4.0, 0, 5, 2), "one of [4, 8]"), (("1", 4.0, 0, 4, 9), "batch must be between 1 and 4")]:
        images, status = handle(*args, progress=lambda *a, **k: None)
        assert message in status, (args, status)

    def broken(ids, **kw):
        raise RuntimeError("device lost")
    model.sample = broken
    _, status = handle("1", 4.0, 0, 4, 2, progress=lambda *a, **k: None)
    assert status.startswith("⚠ generation failed (RuntimeError)") and "device lost" not in status

    assert demo.class_names(1000)[1] == "goldfish"   # ImageNet names from gradio's assets
    assert demo.class_names(3) == ["class 0", "class 1", "class 2"]


@pytest.mark.filterwarnings("ignore:.*:UserWarning")   # gr.Warning outside a request
def test_prompts_run_in_one_bucket_and_long_ones_are_refused():
    """Each new 64-token bucket used to compile (and keep) a new program, and a 1 MB prompt
    was accepted: prompts are padded to the warmed bucket, longer ones get a message."""
    import types

    import gradio as gr
    from bitdance_jax import demo

    calls = []
    pipe = types.SimpleNamespace(
        check_size=lambda h, w: (h, w), config=types.SimpleNamespace(supported_sizes=[(16, 16)]),
        prompt_tokens=lambda p: len(p.split()) + 10,
        generate=lambda prompt, **kw: calls.append(kw["prompt_slots"]) or [object()])
    t2i = demo.TextToImage(pipe, sizes=[(16, 16)], steps=[4], max_prompt_tokens=100)
    assert t2i.prompt_slots == 128
    handle = demo._handler(t2i.generate, gr)
    for prompt in ("a cat", "word " * 100):
        _, status = handle(prompt, "16x16", 4.0, 0, 4, progress=lambda *a, **k: None)
        assert status.startswith("done"), status
    assert calls == [128, 128]
    for prompt in ("word " * 200, "x" * 1_000_000):
        _, status = handle(prompt, "16x16", 4.0, 0, 4, progress=lambda *a, **k: None)
        assert "the prompt is too long: at most 128 tokens" in status, status
    assert calls == [128, 128]

    def failing(prompt, **kw):
        raise FileNotFoundError(2, "No such file", "/srv/secret/weights/params")
    pipe.generate = failing
    _, status = handle("a cat", "16x16", 4.0, 0, 4, progress=lambda *a, **k: None)
    assert "FileNotFoundError" in status and "/srv/secret" not in status, status

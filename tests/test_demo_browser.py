"""``diffbir-demo`` in headless Chromium: the real server (``scripts/demo.py``) on a free port
with the tiny models in the official file formats, one server for the module.

The restored image shown in the page equals, after decoding, what ``diffbir-infer`` writes for
the same file and config (the config the page offers for download); the upload reaches the
runner untouched; progress per step; downloads; bad input and refused options are messages in
the page; jobs queue with a visible position and a cancel stops its job between steps, the next
job waiting until the cancelled one's thread has let the model go.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from browser import fetch_png, free_port, serve
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
JOB_LOG = re.compile(r"^\d\d:\d\d:\d\d job (\w+): (.*)$", re.M)
# Waits that only the machine's load decides (the tiny models' work, Gradio's start).
SLOW = 180_000


@pytest.fixture(scope="module")
def demo(chromium, tmp_path_factory):
    """The demo served from a preset over tiny official-format weights (v2, CPU, 3 steps, a
    small working size), in an empty working folder and its own temporary folder; after the
    module, both are checked to be empty again (nothing left behind)."""
    from diffbir.tiny_weights import write_tiny_weights

    root = tmp_path_factory.mktemp("demo")
    weights = write_tiny_weights(root / "weights")
    preset = root / "tiny.yaml"
    preset.write_text(
        "version: v2\ntask: sr\ndevice: cpu\n"
        f"weights:\n  dir: {weights}\n  cldm_config: control_ldm_tiny\n"
        "  stage1_config: bsrnet_tiny\n"
        "restore:\n  upscale: 1.0\n  steps: 3\n  min_side: 64\n  cfg_scale: 2.0\n"
    )
    work, temp = root / "cwd", root / "tmp"
    work.mkdir()
    temp.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = root / "server.log"
    # One torch thread, as the CLI runs in this process (conftest): the same arithmetic.
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--config", str(preset),
               "--port", str(port)]  # fmt: skip
    start = time.monotonic()
    with serve(command, url, log, env=env, cwd=work, timeout=SLOW / 1000):
        print(f"demo server answered after {time.monotonic() - start:.1f} s")
        yield {"url": url, "log": log, "preset": preset}
    assert not list(work.iterdir()), "the demo wrote into its working folder"
    assert not list(temp.glob("diffbir-demo-*")), "the demo left its temporary folder"


def open_page(page, url: str, *sections: str) -> None:
    """Load the page and open the advanced ``sections`` (at once: a control of a section is
    only built when it opens, and a value typed while it is being built can be lost)."""
    page.goto(url)
    page.locator("#run").wait_for(timeout=SLOW)
    for name in sections:
        page.get_by_text(f"Advanced: {name}", exact=True).click()
        page.locator(f"#section-{name.replace(' ', '-')}").locator("input").first.wait_for()
    # Record every distinct progress text shown, however briefly.
    page.evaluate("""() => {
        window.progressSeen = [];
        new MutationObserver(() => {
            for (const bar of document.querySelectorAll('[role=progressbar]')) {
                const text = bar.getAttribute('aria-valuetext');
                if (text && !window.progressSeen.includes(text)) window.progressSeen.push(text);
            }
        }).observe(document.body, {subtree: true, childList: true, attributes: true});
    }""")


def upload(page, path: Path) -> None:
    page.locator("#photo input[type=file]").set_input_files(str(path))
    page.locator("#photo img").wait_for()


def set_value(page, elem_id: str, value: object) -> None:
    """Type ``value`` into the box of control ``elem_id`` (a number box, or a text box)."""
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.wait_for()
    box.fill(str(value))
    box.press("Enter")


def job_lines(log: Path, since: int = 0) -> list[tuple[str, str]]:
    """``(session, what)`` of the server's job lines after byte ``since`` of its log, in order."""
    return JOB_LOG.findall(log.read_bytes()[since:].decode(errors="replace"))


def test_shown_result_equals_diffbir_infers_bytes_for_the_downloaded_config(
    browser_page, demo, real47_dir, tmp_path
):
    from diffbir.pipeline import cli
    from diffbir.pipeline.presets import resolve_config

    page, photo = browser_page, real47_dir / "48.jpg"
    open_page(page, demo["url"])
    upload(page, photo)
    page.locator("#random-seed").click()
    page.wait_for_function("() => document.querySelector('#opt-seed input').value !== '231'")
    set_value(page, "opt-seed", 5)
    set_value(page, "opt-restore-steps", 4)
    page.locator("#run").click()
    after = page.locator("#slider img").nth(1)
    after.wait_for(timeout=SLOW)
    shown = fetch_png(page, after.get_attribute("src"))

    links = page.locator("#downloads a")
    assert links.count() == 2
    with page.expect_download() as info:
        links.nth(1).click()
    config = tmp_path / info.value.suggested_filename
    info.value.save_as(config)
    assert config.name == "config.yaml"
    # the page's config is the server's preset with the two values typed in the page
    expected, _ = resolve_config(demo["preset"], [], {"seed": 5, "restore.steps": 4})
    assert resolve_config(config)[0] == expected

    out = tmp_path / "cli"
    argv = ["--config", str(config), "--input", str(photo), "--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    written = np.asarray(Image.open(out / "48.png"))
    assert shown.dtype == np.uint8 and shown.shape == written.shape
    assert np.array_equal(shown, written)
    with page.expect_download() as info:
        links.nth(0).click()
    assert Path(info.value.path()).read_bytes() == (out / "48.png").read_bytes()

    before = page.request.get(page.locator("#slider img").nth(0).get_attribute("src")).body()
    assert before == photo.read_bytes(), "the upload reached the server re-encoded"
    seen = page.evaluate("window.progressSeen")
    assert any(re.fullmatch(r"sampling: [1-4] / 4 steps", s) for s in seen), seen
    command = "diffbir-infer --config config.yaml --input 48.jpg"
    assert command in page.locator("#status").inner_text()


def test_bad_input_and_refused_options_are_messages_in_the_page(browser_page, demo, real47_dir,
                                                               tmp_path):  # fmt: skip
    page = browser_page
    open_page(page, demo["url"], "tiling")
    page.locator("#run").click()
    page.get_by_text("Upload a photo first, or pick an example.").wait_for()

    text = tmp_path / "notes.txt"
    text.write_text("a text file, not a photo\n")
    page.locator("#photo input[type=file]").set_input_files(str(text))
    page.get_by_text("Invalid file type: notes.txt").wait_for()
    disguised = tmp_path / "notes.png"
    disguised.write_text("a text file, not a photo\n")
    page.locator("#photo input[type=file]").set_input_files(str(disguised))
    page.get_by_text("notes.png: not a recognised image").wait_for()
    page.locator("#photo img").wait_for(state="hidden")  # refused: the upload is cleared

    upload(page, real47_dir / "48.jpg")
    set_value(page, "opt-restore-tiles-diffusion-stride", 256)
    page.locator("#run").click()
    page.get_by_text("--diffusion-tile-stride: only used with --diffusion-tile (or --tiled), "
                     "got 256 without it").wait_for()  # fmt: skip
    set_value(page, "opt-restore-tiles-diffusion-stride", "")

    set_value(page, "opt-restore-upscale", 64)
    page.locator("#run").click()
    page.get_by_text(re.compile(r"48\.jpg: too large to restore: .* add --tiled")).wait_for(
        timeout=SLOW
    )
    assert "Traceback" not in page.content()


def test_queue_position_and_cancel_between_steps(chromium, browser_page, demo, real47_dir):
    log = demo["log"]
    since = log.stat().st_size
    first = browser_page
    second = chromium.new_context().new_page()
    second.set_default_timeout(SLOW)
    try:
        open_page(first, demo["url"], "restoration")
        open_page(second, demo["url"])
        for page in (first, second):
            upload(page, real47_dir / "48.jpg")
        # The first job is long (1000 steps at a larger working size): the cancel lands in it.
        set_value(first, "opt-restore-steps", 1000)
        set_value(first, "opt-restore-min-side", 320)
        first.locator("#run").click()
        first.wait_for_function(
            "() => window.progressSeen.some(t => /^sampling: [1-9]\\d* \\/ 1000/.test(t))",
            timeout=SLOW,
        )
        second.locator("#run").click()
        second.get_by_text(re.compile(r"queue: 1/\d+")).first.wait_for()
        first.locator("#cancel").click()
        second.locator("#slider img").nth(1).wait_for(timeout=SLOW)
    finally:
        second.context.close()

    lines = job_lines(log, since)
    stopped = [(i, s, what) for i, (s, what) in enumerate(lines) if what.startswith("stopped")]
    assert len(stopped) == 1, lines
    index, first_session, what = stopped[0]
    steps = int(re.fullmatch(r"stopped after (\d+) steps", what).group(1))
    assert 1 <= steps < 1000
    second = [(i, what) for i, (s, what) in enumerate(lines) if s != first_session]
    started = [i for i, what in second if what == "started"]
    # the second job started only once the first one's thread had let the model go
    assert started and started[0] > index, lines
    assert second[-1][1].startswith("done in"), lines

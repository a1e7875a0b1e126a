"""Browser tests of the demo's ground: a minimal Gradio page built with the demo's job slot and
launch helper (a stand-in loop takes the runner's place), served by a child process and driven
in headless Chromium. Upload, per-step progress, the result read back byte-exact, downloads,
errors in the page, the queue and cancel between steps.

No ``from __future__ import annotations`` here: Gradio finds the ``gr.Request`` and
``gr.Progress`` parameters of a handler by its annotations, which must then resolve, and ``gr``
is local to :func:`build_page`."""

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from browser import fetch_png, free_port, serve

STEP_LOG = re.compile(r"^(\d+\.\d+) (\w+) (step|stopped|done|waiting)\b(.*)$", re.M)


def invert_steps(path: str, steps: int, seconds: float, cancelled, on_step, out_dir: Path):
    """Stand-in for the runner: ``steps`` steps of ``seconds`` of torch work each, the cancel
    flag checked before each; writes the inverted image (PNG) and a config (YAML)."""
    import torch

    from diffbir.pipeline.image_io import read_image, to_tensor, write_png, write_text

    img = to_tensor(read_image(path))
    for i in range(steps):
        if cancelled.is_set():
            return i, None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            torch.mm(torch.rand(64, 64), torch.rand(64, 64))
        on_step(i + 1, steps)
    png = write_png(out_dir / (Path(path).stem + ".png"), 1.0 - img)
    yaml = write_text(out_dir / "config.yaml", f"steps: {steps}\n")
    return steps, (png, yaml)


def build_page():
    """The minimal page: upload, steps, run, cancel, before/after slider, downloads."""
    import tempfile

    from diffbir.demo.jobs import Jobs
    from diffbir.demo.serve import import_gradio
    from diffbir.pipeline.image_io import ImageReadError, read_image

    gr = import_gradio()
    jobs = Jobs()

    def log(session: str, what: str) -> None:
        print(f"{time.time():.3f} {session} {what}", flush=True)

    def check_upload(payload):
        """Gradio's own check of an upload shows a bare 'Error'; this names the file."""
        if payload is None:
            return
        try:
            read_image(payload["path"])
        except ImageReadError as err:
            message = f"{payload.get('orig_name')}: {err.reason}"
            raise gr.Error(message, print_exception=False) from None

    # Gradio passes a live progress tracker to the parameter whose default is a gr.Progress.
    def restore(path, steps, seconds, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        if path is None:
            raise gr.Error("Upload an image first.", print_exception=False)
        session = request.session_hash
        log(session, "waiting")
        with jobs.run(session) as cancelled:
            progress((0, int(steps)), desc="sampling", unit="steps")

            def on_step(i: int, n: int) -> None:
                log(session, f"step {i}/{n}")
                progress((i, n), desc="sampling", unit="steps")

            # beside Gradio's own files (the test's temporary folder)
            out_dir = Path(tempfile.mkdtemp(prefix="out-", dir=os.environ.get("GRADIO_TEMP_DIR")))
            done, files = invert_steps(path, int(steps), seconds, cancelled, on_step, out_dir)
        if files is None:
            log(session, f"stopped after {done}/{int(steps)}")
            raise gr.Error(f"Cancelled after {done} steps.", print_exception=False)
        log(session, f"done {files[0]} {files[1]}")
        return (path, str(files[0])), [str(f) for f in files]

    def cancel(request: gr.Request):
        jobs.cancel(request.session_hash)

    with gr.Blocks(title="diffbir demo test page", analytics_enabled=False) as page:
        with gr.Row():
            photo = gr.Image(type="filepath", image_mode=None, label="Photo", elem_id="photo")
            slider = gr.ImageSlider(type="filepath", format="png", label="Before / after",
                                    elem_id="slider", interactive=False)
        steps = gr.Slider(1, 100, value=3, step=1, label="Steps", elem_id="steps")
        seconds = gr.Number(0.1, label="Seconds per step", elem_id="seconds")
        with gr.Row():
            run = gr.Button("Restore", variant="primary", elem_id="run")
            stop = gr.Button("Cancel", elem_id="cancel")
        downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads",
                            interactive=False)
        photo.upload(check_upload, photo, None, preprocess=False).failure(
            lambda: None, None, photo
        )
        job = run.click(restore, [photo, steps, seconds], [slider, downloads],
                        concurrency_limit=1, concurrency_id="model")
        stop.click(cancel, None, None, queue=False, cancels=[job])
    return page


if __name__ == "__main__":
    from diffbir.demo.serve import launch

    launch(build_page(), port=int(sys.argv[1]))


# ---------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def page_server(chromium, tmp_path_factory):
    """This file served as the minimal page on a free port; its log holds the step lines."""
    root = tmp_path_factory.mktemp("demo_page")
    port = free_port()
    log = root / "server.log"
    repo = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": str(repo), "GRADIO_TEMP_DIR": str(root / "gradio")}
    url = f"http://127.0.0.1:{port}/"
    start = time.monotonic()
    with serve([sys.executable, __file__, str(port)], url, log, env=env):
        print(f"page server answered after {time.monotonic() - start:.1f} s")
        yield url, log


def open_page(page, url: str) -> None:
    page.goto(url)
    page.locator("#run").wait_for()
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


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def log_lines(log: Path, since: int = 0) -> list[tuple[float, str, str, str]]:
    """``(time, session, kind, rest)`` of the page's job lines after byte ``since`` of its log."""
    text = log.read_bytes()[since:].decode(errors="replace")
    return [(float(t), s, kind, rest.strip()) for t, s, kind, rest in STEP_LOG.findall(text)]


def test_result_is_shown_byte_exact_with_progress_and_downloads(browser_page, page_server,
                                                                 real47_dir):
    from PIL import Image

    url, log = page_server
    since = log.stat().st_size
    page = browser_page
    open_page(page, url)
    photo = real47_dir / "1.jpg"
    page.locator("#photo input[type=file]").set_input_files(str(photo))
    page.locator("#photo img").wait_for()
    set_number(page, "steps", 4)
    page.locator("#run").click()
    after = page.locator("#slider img").nth(1)
    after.wait_for(timeout=60_000)

    (done,) = [line for line in log_lines(log, since) if line[2] == "done"]
    written_png, written_yaml = map(Path, done[3].split())
    shown = fetch_png(page, after.get_attribute("src"))
    written = np.asarray(Image.open(written_png))
    assert shown.dtype == np.uint8 and np.array_equal(shown, written)
    # the result is of this photo (inverted), not some other image
    original = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    assert np.abs(written.astype(int) - (255 - original)).max() <= 1

    before = page.request.get(page.locator("#slider img").nth(0).get_attribute("src")).body()
    assert before == photo.read_bytes(), "the upload reached the server re-encoded"

    seen = page.evaluate("window.progressSeen")
    assert [f"sampling: {i} / 4 steps" for i in range(1, 5)] == [
        s for s in seen if re.fullmatch(r"sampling: [1-4] / 4 steps", s)
    ], seen

    links = page.locator("#downloads a")
    assert links.count() == 2
    for i, expected in enumerate((written_png, written_yaml)):
        with page.expect_download() as info:
            links.nth(i).click()
        assert info.value.suggested_filename == expected.name
        assert Path(info.value.path()).read_bytes() == expected.read_bytes()


def test_not_an_image_shows_a_message_and_no_traceback(browser_page, page_server, tmp_path):
    url, _log = page_server
    page = browser_page
    open_page(page, url)
    text = tmp_path / "notes.txt"
    text.write_text("a text file, not a photo\n")
    page.locator("#photo input[type=file]").set_input_files(str(text))
    page.get_by_text("Invalid file type: notes.txt").wait_for()

    disguised = tmp_path / "notes.png"
    disguised.write_text("a text file, not a photo\n")
    page.locator("#photo input[type=file]").set_input_files(str(disguised))
    page.get_by_text("notes.png: not a recognised image").wait_for()
    page.locator("#run").click()
    page.get_by_text("Upload an image first.").wait_for()
    assert "Traceback" not in page.content()


def test_queue_shows_position_and_cancel_stops_between_steps(chromium, browser_page,
                                                             page_server, real47_dir):
    url, log = page_server
    since = log.stat().st_size
    first = browser_page
    second = chromium.new_context().new_page()
    try:
        # The first job's steps are long, so that the cancel lands inside one: Gradio lets the
        # next job start at once, while the first one's thread finishes its step.
        for page, steps, seconds in ((first, 60, 3.0), (second, 2, 0.2)):
            open_page(page, url)
            page.locator("#photo input[type=file]").set_input_files(str(real47_dir / "1.jpg"))
            page.locator("#photo img").wait_for()
            set_number(page, "steps", steps)
            set_number(page, "seconds", seconds)
        first.locator("#run").click()
        first.wait_for_function("() => window.progressSeen.some(t => /^sampling: [1-9]/.test(t))")
        second.locator("#run").click()
        second.get_by_text(re.compile(r"queue: 1/\d+")).first.wait_for()
        first.locator("#cancel").click()
        second.locator("#slider img").nth(1).wait_for(timeout=60_000)
    finally:
        second.context.close()

    lines = log_lines(log, since)
    stopped = [line for line in lines if line[2] == "stopped"]
    assert len(stopped) == 1, lines
    first_session = stopped[0][1]
    ran = [line for line in lines if line[1] == first_session and line[2] == "step"]
    assert 1 <= len(ran) < 60 and stopped[0][3] == f"after {len(ran)}/60"
    second_steps = [line for line in lines if line[1] != first_session and line[2] == "step"]
    # the second job ran only once the first one's thread had let the model go
    assert second_steps and min(t for t, *_ in second_steps) > stopped[0][0]

"""The Gradio page of ``diffbir-demo``: an upload, the controls generated from the options
(:mod:`diffbir.demo.controls`), a run and a cancel button, per-step progress, the result beside
the input in a before/after slider, and downloads of the PNG and of the ``config.yaml`` that
gives the same bytes with ``diffbir-infer --config``.

Each run is one :class:`~diffbir.pipeline.runner.Runner` run (:mod:`diffbir.demo.restore`)
holding the server's one model slot (:class:`~diffbir.demo.jobs.Jobs`): jobs queue, each page
sees its place in the queue, and a cancel stops its job between sampling steps. Whatever goes
wrong is a short message in the page; an unexpected error's traceback goes to the server's log.

No ``from __future__ import annotations`` here: Gradio finds the ``gr.Request`` and
``gr.Progress`` parameters of a handler by its annotations, which must then resolve.
"""

import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from diffbir.demo.controls import (
    BASIC,
    SELECTORS,
    Control,
    absent_options,
    apply_shorthand,
    config_values,
    controls,
    follow_selection,
    page_config,
    sections,
    shorthands,
)
from diffbir.demo.jobs import Jobs
from diffbir.demo.restore import ModelCache, Outcome, restore_upload, user_message
from diffbir.demo.serve import import_gradio
from diffbir.pipeline.image_io import ImageReadError, read_image
from diffbir.pipeline.options import InferenceConfig
from diffbir.schema import SettingError

SEED_RANGE = 2**31  # what the "random" button draws from
KEEP_JOB_FOLDERS = 600.0  # seconds a finished job's folder is kept (Gradio copies its results)


def log(session: str, what: str) -> None:
    """One line of the server's job log (one write, so that threads do not interleave)."""
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} job {session[:8]}: {what}\n")
    sys.stdout.flush()


def _new_job_folder(root: Path) -> Path:
    """A fresh folder for a job under ``root``; folders of jobs finished long ago are removed
    (Gradio has copied their results to its own cache by then)."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if time.time() - old.stat().st_mtime > KEEP_JOB_FOLDERS:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="job-", dir=root))


def _ending(outcome: Outcome) -> str:
    """How a job ended, for the log."""
    if outcome.cancelled:
        return f"stopped after {outcome.steps} steps"
    if outcome.failure:
        return f"failed: {outcome.failure}"
    return f"done in {outcome.seconds:.1f} s after {outcome.steps} steps"


def _status(cfg: InferenceConfig, name: str, outcome: Outcome) -> str:
    r = cfg.restore
    text = (
        f"**{name}** restored in {outcome.seconds:.1f} s ({cfg.version}, task {cfg.task}, "
        f"{r.steps} steps of {r.sampler.name}, CFG {r.cfg_scale}, seed {cfg.seed}). The same "
        f"bytes from the command line: `diffbir-infer --config config.yaml --input {name}`, "
        "with the config.yaml below; each image's seed derives from the run seed and the file "
        "name, so keep the name."
    )
    if len(outcome.images) > 1:
        text += f" Sample 1 of {len(outcome.images)} is shown; the downloads hold them all."
    return text


def _absent_text() -> str:
    lines = ["Options of `diffbir-infer` that are not on this page, and why:", ""]
    for reason, names in absent_options().items():
        lines.append(f"- {', '.join(f'`{n}`' for n in names)}: {reason}")
    return "\n".join(lines)


def _component(gr, control: Control, value):
    """The Gradio component of ``control`` showing the config value ``value``."""
    common = {"label": control.label, "info": control.info, "elem_id": control.elem_id,
              "value": control.to_page(value)}  # fmt: skip
    if control.kind == "dropdown":
        return gr.Dropdown(choices=list(control.choices), **common)
    if control.kind == "checkbox":
        return gr.Checkbox(**common)
    if control.kind == "number" and not control.typed:
        return gr.Number(precision=0 if control.integer else None, minimum=control.minimum,
                         maximum=control.maximum, step=control.step, **common)  # fmt: skip
    placeholder = "not set" if control.optional else None
    return gr.Textbox(lines=1, max_lines=6, placeholder=placeholder, **common)


def build_page(
    base: InferenceConfig, workdir: Path, load: ModelCache, examples: Sequence[Path] = ()
):
    """The page (a ``gradio.Blocks``) over the server's config ``base``: its values are the
    controls' starting values and hold every option that is not on the page. Jobs work in
    folders under ``workdir``; ``load`` keeps the models loaded; ``examples``: image files
    offered beside the upload."""
    gr = import_gradio()
    shown = controls()
    jobs = Jobs()
    start = config_values(base, shown)

    components: dict[str, object] = {}
    control_of = {c.key: c for c in shown}
    by_section = sections(shown)
    buttons: dict[str, list] = {}
    for shorthand in shorthands(shown):
        buttons.setdefault(shorthand.group, []).append(shorthand)

    with gr.Blocks(
        title="DiffBIR demo", analytics_enabled=False, delete_cache=(3600, 86400)
    ) as page:
        gr.Markdown(
            f"## DiffBIR\nBlind image restoration with the models this server loaded "
            f"({base.version}, task {base.task}, device {base.device}, {base.precision}): "
            "the same restoration as `diffbir-infer`, through the same config and runner."
        )
        with gr.Row(equal_height=False):
            with gr.Column():
                photo = gr.Image(
                    type="filepath", image_mode=None, label="Photo to restore",
                    elem_id="photo", sources=["upload", "clipboard"], height=360,
                )  # fmt: skip
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=photo,
                                label="Or an example (degraded scikit-image photos)")  # fmt: skip
                with gr.Row():
                    run = gr.Button("Restore", variant="primary", elem_id="run")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                basic = by_section.get(BASIC, [])
                with gr.Row():
                    for control in basic:
                        if not control.typed and control.key != "seed":
                            components[control.key] = _component(gr, control, start[control.key])
                for control in basic:
                    if control.typed:
                        components[control.key] = _component(gr, control, start[control.key])
                if "seed" in start:
                    with gr.Row(equal_height=True):
                        components["seed"] = _component(gr, control_of["seed"], start["seed"])
                        dice = gr.Button("random seed", elem_id="random-seed", scale=0,
                                         min_width=140)  # fmt: skip
            with gr.Column():
                slider = gr.ImageSlider(
                    type="filepath", format="png", label="Before / after", elem_id="slider",
                    interactive=False, height=480,
                )  # fmt: skip
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(label="Downloads: the result and its config",
                                    file_count="multiple", elem_id="downloads",
                                    interactive=False)  # fmt: skip
        shorthand_buttons = []
        for section, members in by_section.items():
            if section == BASIC:
                continue
            with gr.Accordion(f"Advanced: {section}", open=False,
                              elem_id="section-" + section.replace(" ", "-")):  # fmt: skip
                with gr.Row():
                    for control in members:
                        components[control.key] = _component(gr, control, start[control.key])
                for shorthand in buttons.get(section, []):
                    with gr.Row():
                        button = gr.Button(f"{shorthand.flag}", size="sm", scale=0, min_width=120,
                                           elem_id="shorthand-" + shorthand.flag.lstrip("-"))
                        gr.Markdown(shorthand.help)
                    shorthand_buttons.append((shorthand, button))
        with gr.Accordion("Not on this page", open=False):
            gr.Markdown(_absent_text())
        selection = gr.State((base.version, base.task))

        keys = {component: key for key, component in components.items()}
        inputs = set(components.values())
        outputs = list(components.values())

        def values(data) -> dict:
            """The config values of the controls in ``data`` (a value that cannot be one is a
            message in the page)."""
            try:
                return {keys[c]: control_of[keys[c]].from_page(v) for c, v in data.items()
                        if c in keys}  # fmt: skip
            except SettingError as err:
                raise gr.Error(str(err), print_exception=False) from None

        def shown_values(updated: dict) -> dict:
            return {components[k]: control_of[k].to_page(v) for k, v in updated.items()}

        def check_upload(payload):
            """Gradio's own check shows a bare 'Error' for a file that is not an image; this
            names the file and says why."""
            if payload is None:
                return
            try:
                read_image(payload["path"])
            except ImageReadError as err:
                name = payload.get("orig_name") or Path(payload["path"]).name
                raise gr.Error(f"{name}: {err.reason}", print_exception=False) from None

        # Gradio passes a live progress tracker to the parameter whose default is gr.Progress.
        def restore(data, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            path = data[photo]
            if not path:
                raise gr.Error("Upload a photo first, or pick an example.", print_exception=False)
            now = values(data)
            try:
                cfg = page_config(base, now)
            except ValueError as err:  # SettingError, or a sampler's knob check
                raise gr.Error(str(err), print_exception=False) from None
            session, upload = request.session_hash, Path(path)
            log(session, f"waiting: {upload.name}")
            with jobs.run(session) as cancelled:
                if cancelled.is_set():
                    log(session, "cancelled while waiting")
                    raise gr.Error("Cancelled before it started.", print_exception=False)
                log(session, "started")
                progress(0, desc="preparing")

                def on_step(info: dict) -> None:
                    progress((info["i"] + 1, info["total"]), desc="sampling", unit="steps")

                folder = _new_job_folder(workdir / "jobs")
                try:
                    outcome = restore_upload(
                        cfg, upload, folder, load=load, stop=cancelled, on_step=on_step
                    )
                except Exception as err:
                    message = user_message(err)
                    if message is None:
                        traceback.print_exc()
                        message = (f"the restoration failed ({type(err).__name__}: {err}); the "
                                   "server's log has the details")  # fmt: skip
                    log(session, f"failed: {message}")
                    raise gr.Error(message, print_exception=False) from None
                log(session, _ending(outcome))  # before the next job may start
            if outcome.cancelled:
                raise gr.Error(f"Cancelled after {outcome.steps} sampling steps.",
                               print_exception=False)  # fmt: skip
            if outcome.failure:
                raise gr.Error(f"{upload.name}: {outcome.failure}", print_exception=False)
            files = [str(p) for p in (*outcome.images, outcome.config)]
            return (path, str(outcome.images[0])), files, _status(cfg, upload.name, outcome)

        def cancel(request: gr.Request):
            jobs.cancel(request.session_hash)

        def follow(data):
            """Version or task changed: values at the old one's defaults take the new one's."""
            now = values(data)
            new = tuple(now[k] for k in SELECTORS)
            updated = follow_selection(now, data[selection], new)
            return {**shown_values(updated), selection: new}

        def shorthand_handler(shorthand):
            def handler(data):
                return shown_values(apply_shorthand(shorthand, base, values(data)))

            return handler

        photo.upload(check_upload, photo, None, preprocess=False).failure(
            lambda: None, None, photo, queue=False
        )
        job = run.click(restore, {photo, *inputs}, [slider, downloads, status],
                        concurrency_limit=1, concurrency_id="model")  # fmt: skip
        stop.click(cancel, None, None, queue=False, cancels=[job])
        if all(k in components for k in SELECTORS):
            for key in SELECTORS:
                components[key].input(follow, {selection, *inputs}, [*outputs, selection],
                                       queue=False)  # fmt: skip
        if "seed" in components:
            dice.click(lambda: random.randrange(SEED_RANGE), None, components["seed"],
                       queue=False)  # fmt: skip
        for shorthand, button in shorthand_buttons:
            button.click(shorthand_handler(shorthand), inputs, outputs, queue=False)
    return page

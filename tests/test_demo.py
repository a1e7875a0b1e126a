"""The demo's job slot and launch helper, without a browser (see test_demo_browser.py)."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import pytest

from diffbir.demo.jobs import Jobs
from diffbir.demo.serve import ShareLinkError, import_gradio, launch
from diffbir.schema import SettingError, setting


def test_cancel_reaches_the_sessions_running_job_only():
    jobs = Jobs()
    with jobs.run("a") as flag_a:
        assert not jobs.cancel("b")  # no job of b's: nothing to stop
        assert not flag_a.is_set()
        assert jobs.cancel("a")
        assert flag_a.is_set()
    assert not jobs.cancel("a")  # ended: forgotten


def test_second_job_waits_for_the_first_to_end_and_a_cancel_while_waiting_counts():
    jobs = Jobs()
    events = []
    second_waiting = threading.Event()

    def second() -> None:
        second_waiting.set()
        with jobs.run("b") as flag:
            events.append(("b starts", flag.is_set()))

    with jobs.run("a"):
        thread = threading.Thread(target=second)
        thread.start()
        second_waiting.wait(5)
        thread.join(0.2)
        assert thread.is_alive()  # blocked on the model
        assert jobs.cancel("b")  # cancelled while waiting
        events.append(("a ends", None))
    thread.join(5)
    assert events == [("a ends", None), ("b starts", True)]


def test_a_sessions_newer_job_has_its_own_flag():
    jobs = Jobs()
    with jobs.run("a") as old:
        jobs.cancel("a")
    with jobs.run("a") as new:
        assert old.is_set() and not new.is_set()


def test_missing_gradio_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ImportError, match=r"diffbir\[demo\]"):
        import_gradio()


class FakeBlocks:
    """What :func:`launch` calls on a ``gradio.Blocks``, recorded."""

    def __init__(self, share_url: str | None) -> None:
        self.share_url = share_url
        self.calls: list[tuple[str, dict]] = []

    def queue(self, **kwargs):
        self.calls.append(("queue", kwargs))
        return self

    def launch(self, **kwargs):
        self.calls.append(("launch", kwargs))
        return None, "http://127.0.0.1:7860/", self.share_url

    def close(self):
        self.calls.append(("close", {}))

    def block_thread(self):
        self.calls.append(("block_thread", {}))


def test_launch_serves_on_localhost_one_job_at_a_time_without_run_history():
    blocks = FakeBlocks(share_url=None)
    assert launch(blocks, port=7860) == "http://127.0.0.1:7860/"
    (_, queue), (_, served), (last, _) = blocks.calls
    assert queue["default_concurrency_limit"] == 1
    assert served["server_name"] == "127.0.0.1" and served["server_port"] == 7860
    assert served["share"] is False and served["run_history"] is False
    assert last == "block_thread"


def test_share_without_a_link_closes_the_server_and_says_why():
    blocks = FakeBlocks(share_url=None)
    with pytest.raises(ShareLinkError, match="public link"):
        launch(blocks, share=True)
    assert [name for name, _ in blocks.calls] == ["queue", "launch", "close"]


# ------------------------------------------------------------ controls generated from the options


def test_every_cli_option_has_a_control_or_is_listed_as_absent():
    """Each option of diffbir-infer's (generated) parser: a control, a shorthand's button, or
    a reason in the one absent list; and no stale entry in that list."""
    from diffbir.demo.controls import ABSENT, absent_reason, controls, shorthands
    from diffbir.pipeline.arguments import RUN_PREFIX, SHORTHAND_PREFIX, build_parser
    from diffbir.pipeline.options import InferenceConfig, RunOptions
    from diffbir.schema import leaves

    shown = controls()
    keys = {c.key for c in shown}
    buttons = {SHORTHAND_PREFIX + s.flag.lstrip("-") for s in shorthands(shown)}
    actions = [a for a in build_parser()._actions if a.dest != "help"]
    for action in actions:
        on_page = action.dest in keys or action.dest in buttons
        reason = absent_reason(action.dest)
        assert on_page != (reason is not None), (action.option_strings or action.dest, reason)
    fields = [key for key, _, _ in leaves(InferenceConfig)]
    fields += [RUN_PREFIX + key for key, _, _ in leaves(RunOptions)]
    for key in fields:  # config-only fields too (fields without a flag)
        assert (key in keys) != (absent_reason(key) is not None), key
    dests = {a.dest for a in actions}
    for name in ABSENT:
        matched = [d for d in dests if d == name or (name.endswith(".") and d.startswith(name))]
        assert matched, f"ABSENT entry {name!r} names no option"


@dataclass
class ExtraOptions:
    """Fields of every kind, as another engineer might add them."""

    mode: str = setting("a", flag="--mode", choices=("a", "b"), help="a mode", group="new")
    flag: bool = setting(False, flag="--flag-it", help="a switch", group="new")
    count: int | None = setting(None, flag="--count", low=1, high=9, help="how many")
    weight: float = setting(0.5, flag="--weight", low=0.0, help="a weight", group="new")
    words: str = setting("", flag="--words", help="some words", group="new")
    tags: list[str] = setting(factory=list, flag="--tags", help="tags", group="new")


@dataclass
class NewOptions:
    seed: int = setting(1, flag="--seed", help="the seed")
    extra: ExtraOptions = setting(factory=ExtraOptions)


def test_controls_follow_each_fields_setting_with_no_demo_edit():
    """A field added to the options gets a control from its hint and Setting alone."""
    from diffbir.demo.controls import BASIC, controls

    made = {c.key: c for c in controls(NewOptions)}
    assert made["seed"].section == BASIC and made["extra.mode"].section == "new"
    assert made["extra.count"].section == "other"  # no group: still on the page
    assert (made["extra.mode"].kind, made["extra.mode"].choices) == ("dropdown", ("a", "b"))
    assert made["extra.flag"].kind == "checkbox"
    assert made["extra.flag"].label == "flag it (--flag-it)"
    count = made["extra.count"]
    assert (count.kind, count.integer, count.minimum, count.maximum) == ("number", True, 1, 9)
    assert count.optional and count.typed  # a number box cannot be empty: a text box
    assert count.from_page("") is None and count.from_page("3") == 3 and count.to_page(3) == "3"
    with pytest.raises(SettingError, match=r"^--count: expected an integer, got 'x'"):
        count.from_page("x")
    assert made["extra.weight"].from_page(1) == 1.0 and not made["extra.weight"].integer
    assert made["extra.words"].kind == "text" and made["extra.words"].info == "some words"
    tags = made["extra.tags"]
    assert tags.kind == "yaml" and tags.from_page(tags.to_page(["x", "y z"])) == ["x", "y z"]


def _tiny_base():
    from diffbir.pipeline.presets import resolve_config

    cfg, _ = resolve_config(None, ["restore.min_side=64"], {"version": "v2", "device": "cpu"})
    return cfg


def test_page_values_give_the_config_the_same_flags_give():
    from diffbir.demo.controls import config_values, controls, page_config
    from diffbir.pipeline.presets import resolve_config

    base = _tiny_base()
    values = config_values(base, controls())
    values |= {"seed": 5, "restore.steps": 7, "restore.tiles.diffusion": 384,
               "restore.sampler.name": "ddim"}  # fmt: skip
    flags = {"version": "v2", "device": "cpu", "seed": 5, "restore.steps": 7,
             "restore.tiles.diffusion": 384, "restore.sampler.name": "ddim"}  # fmt: skip
    expected, _ = resolve_config(None, ["restore.min_side=64"], flags)
    assert page_config(base, values) == expected


def test_a_refused_combination_raises_the_command_lines_message():
    from diffbir.demo.controls import config_values, controls, page_config
    from diffbir.pipeline.presets import resolve_config

    base = _tiny_base()
    cases = [
        ({"restore.tiles.diffusion_stride": 256}, {"restore.tiles.diffusion_stride": 256}),
        ({"restore.guidance.loss": "mse"}, {"restore.guidance.loss": "mse"}),
        ({"restore.steps": 1}, {"restore.steps": 1}),
        ({"restore.sampler.eta": 0.5}, {"restore.sampler.eta": 0.5}),  # spaced has no eta
    ]
    for page_changes, flags in cases:
        with pytest.raises(ValueError) as from_page:  # SettingError, or a sampler's
            page_config(base, config_values(base, controls()) | page_changes)
        with pytest.raises(ValueError) as from_flags:
            resolve_config(None, ["restore.min_side=64"], {"version": "v2", **flags})
        assert str(from_page.value) == str(from_flags.value)


def test_another_version_takes_its_defaults_where_the_values_were_defaults():
    from diffbir.demo.controls import config_values, controls, follow_selection
    from diffbir.pipeline.presets import default_config

    base = _tiny_base()  # v2, with min_side changed from the default
    values = config_values(base, controls()) | {"version": "v2.1", "restore.cfg_scale": 3.0}
    after = follow_selection(values, ("v2", "sr"), ("v2.1", "sr"))
    v21 = default_config("v2.1", "sr").restore
    assert after["restore.steps"] == v21.steps and after["restore.sampler.name"] == v21.sampler.name
    assert after["restore.pos_prompt"] == v21.pos_prompt
    assert after["restore.cfg_scale"] == 3.0  # set by hand: kept
    assert after["restore.min_side"] == 64  # set by the server's config: kept
    assert after["version"] == "v2.1"


def test_shorthand_buttons_set_what_their_flags_set():
    from diffbir.demo.controls import apply_shorthand, config_values, controls, shorthands
    from diffbir.pipeline.options import TILED

    base = _tiny_base()
    by_flag = {s.flag: s for s in shorthands(controls())}
    values = config_values(base, controls()) | {"restore.tiles.diffusion": 384}
    tiled = apply_shorthand(by_flag["--tiled"], base, values)
    assert "restore.tiles.diffusion" not in tiled  # typed on the page: kept
    assert tiled["restore.tiles.vae_decoder"] == TILED.vae_decoder
    assert apply_shorthand(by_flag["--guidance"], base, values) == {"restore.guidance.scale": 0.5}
    changed = values | {"restore.guidance.scale": 0.2}
    assert apply_shorthand(by_flag["--guidance"], base, changed) == {}


def test_demo_command_line_is_diffbir_infers_config_plus_where_to_serve():
    from diffbir.demo.cli import build_parser
    from diffbir.pipeline.arguments import RUN_PREFIX, invocation
    from diffbir.pipeline.arguments import build_parser as infer_parser

    demo = {a.dest for a in build_parser()._actions}
    infer = {a.dest for a in infer_parser()._actions if not a.dest.startswith(RUN_PREFIX)}
    assert demo - infer == {"host", "port", "share"} and infer <= demo
    args = build_parser().parse_intermixed_args(["--config", "v2", "restore.steps=9", "--tiled",
                                                 "--seed", "3", "--port", "8000"])  # fmt: skip
    given = invocation(vars(args))
    assert given.preset == "v2" and given.overrides == ["restore.steps=9"]
    assert given.flags["seed"] == 3 and given.flags["restore.tiles.diffusion"] == 512
    assert "port" not in given.flags and args.host == "127.0.0.1" and not args.share


# ---------------------------------------------------------------- one upload through the runner


def test_models_stay_loaded_until_another_set_is_asked_for():
    from types import SimpleNamespace

    from diffbir.demo.restore import ModelCache

    loaded = []

    def load(plan, *, device, precision):
        loaded.append((plan, precision))
        return object()

    cache = ModelCache(load)
    fp32, bf16 = SimpleNamespace(precision="fp32"), SimpleNamespace(precision="bf16")
    first = cache("plan A", fp32, "cpu")
    assert cache("plan A", fp32, "cpu") is first and len(loaded) == 1
    assert cache("plan B", fp32, "cpu") is not first and len(loaded) == 2
    cache("plan B", bf16, "cpu")
    cache("plan B", bf16, "cpu")
    assert loaded == [("plan A", "fp32"), ("plan B", "fp32"), ("plan B", "bf16")]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, real47_dir):
    """The server's config over tiny official-format weights, a model cache and a photo."""
    from diffbir.demo.restore import ModelCache
    from diffbir.pipeline.presets import resolve_config
    from diffbir.tiny_weights import write_tiny_weights

    weights = write_tiny_weights(tmp_path_factory.mktemp("weights"))
    flags = {"version": "v2", "device": "cpu", "weights.dir": str(weights),
             "weights.cldm_config": "control_ldm_tiny", "weights.stage1_config": "bsrnet_tiny",
             "restore.upscale": 1.0, "restore.steps": 2, "restore.min_side": 64}  # fmt: skip
    cfg, _ = resolve_config(None, [], flags)
    return cfg, ModelCache(), real47_dir / "48.jpg"


def test_upload_restored_cancelled_or_refused_with_the_runners_reason(tiny_demo, tmp_path):
    import dataclasses

    from diffbir.demo.restore import restore_upload

    cfg, cache, photo = tiny_demo
    steps = []

    def on_step(info):
        steps.append((info["i"], info["total"]))

    done = restore_upload(cfg, photo, tmp_path / "a", load=cache, stop=threading.Event(),
                          on_step=on_step)  # fmt: skip
    assert [p.name for p in done.images] == ["48.png"] and done.images[0].is_file()
    assert done.config.read_text().startswith("version: v2") and steps == [(0, 2), (1, 2)]
    assert not (tmp_path / "a" / "input").exists()  # the copy of the upload is gone

    stop = threading.Event()  # cancelled during the first of 2 steps: ends after it
    cancelled = restore_upload(cfg, photo, tmp_path / "b", load=cache, stop=stop,
                               on_step=lambda info: stop.set())  # fmt: skip
    assert cancelled.cancelled and cancelled.steps == 1 and not cancelled.images
    early = restore_upload(cfg, photo, tmp_path / "d", load=cache, stop=stop)  # before any
    assert early.cancelled and early.steps == 0

    huge = dataclasses.replace(cfg, restore=dataclasses.replace(cfg.restore, upscale=64.0))
    refused = restore_upload(huge, photo, tmp_path / "c", load=cache, stop=threading.Event())
    assert "too large to restore" in refused.failure and "--tiled" in refused.failure
    assert not refused.images


def test_user_errors_are_messages_and_bugs_are_not():
    from diffbir.demo.restore import user_message
    from diffbir.weights import MissingWeightsError

    assert user_message(SettingError("--steps: expected ...")) == "--steps: expected ..."
    assert "v2.pth" in user_message(MissingWeightsError("missing: weights/v2.pth"))
    assert user_message(KeyError("x")) is None

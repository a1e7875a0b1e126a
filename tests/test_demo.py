"""The demo's job slot and launch helper, without a browser (see test_demo_browser.py)."""

from __future__ import annotations

import sys
import threading

import pytest

from diffbir.demo.jobs import Jobs
from diffbir.demo.serve import ShareLinkError, import_gradio, launch


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

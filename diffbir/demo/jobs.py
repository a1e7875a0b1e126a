"""One restoration at a time on one loaded model, each cancellable from its own browser session.

Gradio's ``concurrency_limit=1`` alone does not give this: a cancel click (``cancels=[event]``)
frees the event's slot at once, while the worker thread that runs torch code cannot be stopped
from outside and goes on until it returns, so the next queued job would start beside it. Here
the job's own thread holds the lock until it really ends, and a cancel click reaches the job as
a :class:`threading.Event` that the runner checks between sampling steps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Jobs:
    """The job slot of one model and the cancel flag of each browser session's job."""

    def __init__(self) -> None:
        self._model = threading.Lock()
        self._flags: dict[str, threading.Event] = {}
        self._flags_lock = threading.Lock()

    @contextmanager
    def run(self, session: str) -> Iterator[threading.Event]:
        """Wait for the model, then hold it for the ``with`` block; yields the job's cancel flag.

        The flag is registered before waiting, so a cancel sent while the job waits stops it
        before its first step. A session's newer job replaces its flag; the older one keeps its
        own (already set) flag until it ends.
        """
        flag = threading.Event()
        with self._flags_lock:
            self._flags[session] = flag
        try:
            with self._model:
                yield flag
        finally:
            with self._flags_lock:
                if self._flags.get(session) is flag:
                    del self._flags[session]

    def cancel(self, session: str) -> bool:
        """Ask the session's job to stop at its next check; ``False`` if it has none."""
        with self._flags_lock:
            flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

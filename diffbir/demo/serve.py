"""Gradio imported with its telemetry off, and a page served on this machine unless asked."""

from __future__ import annotations

import os
from typing import Any

DEFAULT_HOST = "127.0.0.1"


class ShareLinkError(RuntimeError):
    """``share=True`` was asked but Gradio opened no public link."""


def import_gradio() -> Any:
    """The ``gradio`` module, with its telemetry and version check turned off; an ImportError
    naming the extra that installs it when it is missing."""
    # Read by Gradio at each call, not only at import: the demo never reports home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as err:
        raise ImportError("the web demo needs Gradio: pip install 'diffbir[demo]'") from err
    return gradio


def launch(
    blocks: Any, host: str = DEFAULT_HOST, port: int | None = None, share: bool = False,
    max_queue: int = 16, block: bool = True,
) -> str:
    """Serve ``blocks`` (a ``gradio.Blocks``) at ``host:port`` and return its local address.

    Jobs queue (at most ``max_queue`` waiting) and run one at a time unless an event says
    otherwise. No run history is kept in the browser. With ``share`` a public link is asked of
    Gradio's tunnel service, which needs the internet and a program Gradio downloads on first
    use; when no link comes, the server is closed and :class:`ShareLinkError` raised. With
    ``block`` this returns only when the server stops (Ctrl+C).
    """
    blocks.queue(max_size=max_queue, default_concurrency_limit=1)
    _app, local_url, share_url = blocks.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=True,
        run_history=False, show_error=False,
    )
    if share and not share_url:
        blocks.close()
        raise ShareLinkError(
            "share: Gradio could not open a public link (it needs the internet and its tunnel "
            "program, which it downloads on first use); serve without share, or on a host "
            "address of your network"
        )
    if block:
        blocks.block_thread()
    return local_url

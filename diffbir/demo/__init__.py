"""The web demo (``diffbir-demo``): a Gradio page around the same runner as ``diffbir-infer``.

Gradio is an optional dependency (the ``demo`` extra); only :mod:`diffbir.demo.serve` imports it.
"""

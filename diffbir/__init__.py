"""DiffBIR: blind image restoration with a generative diffusion prior."""

__version__ = "0.1.0"

"""Callbacks, one per file."""

from diffusion_lightning.callbacks.summary import RunSummary

__all__ = ["RunSummary"]

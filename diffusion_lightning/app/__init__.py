"""``diffusion-lightning app``: a local web app to generate images, browse runs and train.

The app is built with gradio (the ``app`` extra: ``pip install 'diffusion_lightning[app]'``), which
is imported only when the app starts, so the rest of the package does not need it. Its tabs:

- *Generate*: sample from an exported pipeline folder or a ``.ckpt`` under the app's root
  (:mod:`diffusion_lightning.app.generate`);
- *Runs*: the configs, curves, sample grids and evaluation tables of the runs under the root
  (:mod:`diffusion_lightning.app.runs`);
- *Train*: start, watch and stop a ``fit`` (:mod:`diffusion_lightning.app.train`).

Every path the app is given must lie under its root (:func:`diffusion_lightning.app.paths.under_root`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> Any:
    """``diffusion-lightning app``: see :func:`diffusion_lightning.app.command.main`."""
    from diffusion_lightning.app.command import main as run

    return run(argv)

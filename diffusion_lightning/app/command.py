"""``diffusion-lightning app``: the command that serves the app on this machine."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_lightning.commands.common import CommandParser, add_dataclass_flags, from_args

#: What ``app`` says when gradio is not installed.
MISSING_GRADIO = "error: diffusion-lightning app needs gradio: pip install 'diffusion_lightning[app]'"
#: gradio's settings that keep it from reaching the network (usage analytics, update checks).
OFFLINE_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TELEMETRY_ENABLED": "False"}
#: Images and styles of the page: generated images are small, so they are drawn with sharp pixels.
CSS = "img { image-rendering: pixelated; }"


@dataclass
class AppArguments:
    """Where the app serves and what it works on.

    Args:
        root: Folder the app reads and writes under: pipelines, checkpoints and runs; nothing outside it is opened.
        configs: Folder of the YAML fit configs the Train tab offers (searched recursively).
        host: Address to serve on (the default serves this machine only).
        port: Port to serve on; 0 picks a free one.
        device: Device the Generate tab samples on: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """

    root: str = "outputs"
    configs: str = "configs"
    host: str = "127.0.0.1"
    port: int = 7860
    device: str = "auto"


def build_parser() -> CommandParser:
    """The ``app`` parser: :class:`AppArguments`."""
    parser = CommandParser(
        prog="diffusion-lightning app",
        description="A local web app: generate images from exported pipelines and checkpoints, browse the runs "
        "(configs, curves, sample grids, evaluations) and start, watch and stop training, all under --root.",
    )
    add_dataclass_flags(parser, AppArguments)
    return parser


def import_gradio() -> Any:
    """gradio, imported without its analytics; ``SystemExit`` with :data:`MISSING_GRADIO` when it is missing."""
    for key, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    try:
        import gradio
    except ImportError as error:
        raise SystemExit(MISSING_GRADIO) from error
    return gradio


def build_app(options: AppArguments) -> Any:
    """The app as a ``gr.Blocks`` (not launched)."""
    gr = import_gradio()
    from diffusion_lightning.app import generate, runs, train

    root = Path(options.root)
    cache = generate.PipelineCache(root, device=options.device)
    job = train.TrainingJob(root)
    with gr.Blocks(title="diffusion-lightning") as demo:
        gr.Markdown(f"# diffusion-lightning\nWorking under `{root.resolve()}`.")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate.build_tab(root, cache)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs.build_tab(root)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train.build_tab(root, options.configs, job)
    demo.training_job = job  # so whoever launched the app can stop its training
    demo.root = root
    return demo


def free_port(host: str) -> int:
    """A port on ``host`` that nothing listens on now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def launch(demo: Any, host: str, port: int, block: bool = True) -> tuple[Any, str, str]:
    """Serve ``demo`` on ``host:port`` (0: a free port), never shared, without fetching anything.

    The page may show the files under the app's root (the images of its runs), and no others.
    """
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return demo.launch(
        server_name=host,
        server_port=port or free_port(host),
        share=False,
        prevent_thread_lock=not block,
        ssr_mode=False,
        theme=theme,
        css=CSS,
        footer_links=[],
        allowed_paths=[os.fspath(demo.root.resolve())],
        quiet=not block,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the app until interrupted."""
    args = build_parser().parse_args(argv)
    options = from_args(AppArguments, args)
    if not 0 <= options.port <= 65535:
        raise SystemExit(f"error: --port={options.port} must be in 0..65535 (0: a free port).")
    if not Path(options.root).is_dir():
        raise SystemExit(f"error: --root {options.root!r} is not a folder; create it or give another one.")
    demo = build_app(options)
    try:
        launch(demo, options.host, options.port, block=True)
    finally:
        demo.training_job.stop()

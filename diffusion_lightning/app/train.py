"""The *Train* tab: start a ``fit`` from a config, watch its step, loss and ETA, and stop it cleanly.

The fit runs as ``python -m diffusion_lightning fit --config CONFIG OVERRIDES`` in a subprocess,
in ``<root>/<run name>`` (``--trainer.default_root_dir``), with two callbacks appended to the
config's: :class:`~diffusion_lightning.app.progress.ProgressFile`, whose ``progress.json`` the tab
reads, and :class:`~diffusion_lightning.callbacks.graceful_stop.CheckpointOnSigterm`. *Stop* sends
the process SIGTERM: Lightning stops at the next batch boundary and the callback saves
``checkpoints/last.ckpt``, from which ``fit --ckpt_path last`` (the tab's *Resume*) continues.
One training runs at a time.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusion_lightning.app.paths import relative, under_root
from diffusion_lightning.app.progress import PROGRESS_FILE

#: Callbacks appended to every fit the app starts.
APP_CALLBACKS = (
    "diffusion_lightning.app.progress.ProgressFile",
    "diffusion_lightning.callbacks.graceful_stop.CheckpointOnSigterm",
)
#: The fit's output, in the run folder.
LOG_FILE = "app_fit.log"
#: Seconds a stopped fit has to save its checkpoint and exit before it is killed.
STOP_TIMEOUT_S = 120.0
#: Override keys that would put the run's files outside the root, or read other configs; refused.
REFUSED_OVERRIDES = ("default_root_dir", "dirpath", "save_dir")


def list_configs(folder: str | os.PathLike[str]) -> list[str]:
    """The YAML files under ``folder`` (recursively), relative to it."""
    base = Path(folder)
    if not base.is_dir():
        return []
    found = [path for pattern in ("*.yaml", "*.yml") for path in base.rglob(pattern)]
    return sorted(path.relative_to(base).as_posix() for path in found)


def parse_overrides(text: str) -> list[str]:
    """Command-line overrides from text: one or more per line, shell-quoted, ``#`` starts a comment.

    Raises:
        SystemExit: ``error: ...`` for text that does not split, or an override the app refuses.
    """
    argv: list[str] = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        try:
            argv += shlex.split(line, comments=True)
        except ValueError as error:
            raise SystemExit(f"error: overrides line {number} ({line.strip()!r}) does not parse: {error}.") from error
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in ("-c", "--config"):
            raise SystemExit("error: --config is chosen with the Config list, not among the overrides.")
        if key.startswith("--") and key.rsplit(".", 1)[-1] in REFUSED_OVERRIDES:
            raise SystemExit(
                f"error: {key} is set by the app (the run goes to <root>/<run name>); choose the run name instead."
            )
        if key in ("--ckpt_path", "--fork_from"):
            raise SystemExit(f"error: {key} is set by the app; use Resume to continue a stopped run.")
    return argv


def format_seconds(seconds: float | None) -> str:
    """``1h02m03s``, ``2m03s`` or ``3s``; ``?`` for ``None``."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class TrainingJob:
    """The one ``fit`` the app runs at a time.

    Args:
        root: The app's root; runs go to ``<root>/<run name>``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.process: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        self.command: list[str] = []
        self.message = ""
        self._log: Any = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Whether a fit started here is still running."""
        return self.process is not None and self.process.poll() is None

    def build_command(self, config: str, overrides: Sequence[str], run_dir: Path, resume: bool = False) -> list[str]:
        """The ``fit`` command line of a run (what :meth:`start` runs)."""
        command = [sys.executable, "-m", "diffusion_lightning", "fit", "--config", config, *overrides]
        command += ["--trainer.default_root_dir", os.fspath(run_dir)]
        command += [f"--trainer.callbacks+={callback}" for callback in APP_CALLBACKS]
        if resume:
            command += ["--ckpt_path", "last"]
        return command

    def start(
        self, config: str, overrides: str, run_name: str, configs: str | os.PathLike[str], resume: bool = False
    ) -> str:
        """Start a fit; what it says about it.

        Raises:
            SystemExit: ``error: ...`` when one is running already, or for a config, run name or override
                the app refuses.
        """
        with self._lock:
            if self.running:
                assert self.run_dir is not None and self.process is not None
                raise SystemExit(
                    f"error: a training is already running ({relative(self.root, self.run_dir)}, pid "
                    f"{self.process.pid}); stop it before starting another."
                )
            if not config:
                raise SystemExit("error: choose a config.")
            try:
                config_path = under_root(configs, config, "config")
            except ValueError as error:
                raise SystemExit(f"error: {error}") from error
            if not config_path.is_file():
                raise SystemExit(f"error: config {config!r} does not exist.")
            if not run_name or not run_name.strip():
                raise SystemExit("error: give the run a name (its folder under the root).")
            try:
                run_dir = under_root(self.root, run_name.strip(), "run name")
            except ValueError as error:
                raise SystemExit(f"error: {error}") from error
            if run_dir == self.root.resolve():
                raise SystemExit("error: the run name must name a folder under the root, not the root itself.")
            argv = parse_overrides(overrides)
            if resume and not (run_dir / "checkpoints" / "last.ckpt").is_file():
                raise SystemExit(f"error: {run_name!r} has no checkpoints/last.ckpt to resume from.")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
            self.command = self.build_command(os.fspath(config_path), argv, run_dir, resume)
            if self._log is not None:
                self._log.close()
            self._log = open(run_dir / LOG_FILE, "w")  # noqa: SIM115 (open while the fit runs)
            self._log.write(shlex.join(self.command) + "\n")
            self._log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.process = subprocess.Popen(
                self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            self.run_dir = run_dir
            self.message = f"started {relative(self.root, run_dir)} (pid {self.process.pid})"
            return self.message

    def progress(self) -> dict[str, Any]:
        """The run's ``progress.json`` (empty before training starts)."""
        if self.run_dir is None:
            return {}
        try:
            return json.loads((self.run_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the fit's output (progress-bar redraws split into lines)."""
        if self.run_dir is None:
            return ""
        try:
            text = (self.run_dir / LOG_FILE).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    def status(self) -> str:
        """One line: the run, its state, step, loss and ETA."""
        if self.process is None or self.run_dir is None:
            return "no training started"
        info = self.progress()
        name = relative(self.root, self.run_dir)
        code = self.process.poll()
        state = "running" if code is None else f"exited ({code})"
        if code is not None and info.get("status") in ("finished", "stopped"):
            state = info["status"]
        parts = [f"{name}: {state}"]
        if info:
            total = info.get("max_steps")
            parts.append(f"step {info.get('step', 0)}" + (f" / {total}" if total else ""))
            parts.append(f"epoch {info.get('epoch', 0)}")
            if info.get("loss") is not None:
                parts.append(f"loss {info['loss']:.4g}")
            if code is None:
                parts.append(f"ETA {format_seconds(info.get('eta_s'))}")
        elif code is None:
            parts.append("starting")
        if self.message and code is not None:
            parts.append(self.message)
        return ", ".join(parts)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> str:
        """Ask the fit to stop (SIGTERM), wait for it, and say where its checkpoint is."""
        process = self.process
        if process is None or process.poll() is not None:
            return "no training is running"
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self.message = f"did not stop within {timeout:.0f} s and was killed"
            return self.message
        assert self.run_dir is not None
        last = self.run_dir / "checkpoints" / "last.ckpt"
        step = self.progress().get("step")
        if last.is_file():
            saved = _checkpoint_step(last)
            at = "" if saved == step else f" (at step {saved})"
            self.message = (
                f"stopped at step {step}; saved {relative(self.root, last)}{at} (Resume, or fit --ckpt_path last, "
                "continues from it)"
            )
        else:
            self.message = "stopped before training started; no checkpoint was saved"
        return self.message


def _checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` a checkpoint records (its tensors mapped, not loaded)."""
    from diffusion_lightning.modules.loading import read_checkpoint

    try:
        return int(read_checkpoint(path, mmap=True)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------- the tab


def build_tab(root: str | os.PathLike[str], configs: str | os.PathLike[str], job: TrainingJob) -> None:
    """The *Train* tab's components and events (inside a ``gr.Blocks``)."""
    import gradio as gr

    def start(config: str, overrides: str, run_name: str, resume: bool) -> tuple[str, str]:
        try:
            job.start(config, overrides, run_name, configs, resume=resume)
        except SystemExit as error:
            raise gr.Error(str(error)) from None
        return job.status(), job.log_tail()

    def stop() -> tuple[str, str]:
        message = job.stop()
        if message == "no training is running":
            gr.Warning(message)
        return job.status(), job.log_tail()

    def poll() -> tuple[str, str]:
        return job.status(), job.log_tail()

    def default_name(config: str) -> str:
        return Path(config).stem if config else ""

    choices = list_configs(configs)
    with gr.Row():
        config = gr.Dropdown(choices=choices, value=None, label=f"Config (under {configs}/)", elem_id="train-config",
                             scale=3)  # fmt: skip
        run_name = gr.Textbox(label="Run name (folder under the root)", elem_id="train-run-name", scale=2)
        resume = gr.Checkbox(label="Resume from its last.ckpt", value=False, elem_id="train-resume", scale=1)
    overrides = gr.Textbox(
        label="Overrides, e.g. --trainer.max_steps 20 (one or more per line)", lines=4, elem_id="train-overrides"
    )
    with gr.Row():
        start_button = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
    status = gr.Textbox(label="Status", value=job.status(), interactive=False, elem_id="train-status")
    log = gr.Textbox(label="Output", lines=12, max_lines=12, interactive=False, elem_id="train-log")
    timer = gr.Timer(1.0)

    config.change(default_name, inputs=config, outputs=run_name)
    start_button.click(start, inputs=[config, overrides, run_name, resume], outputs=[status, log])
    stop_button.click(stop, outputs=[status, log])
    timer.tick(poll, outputs=[status, log])

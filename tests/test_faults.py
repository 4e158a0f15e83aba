"""Real kills: ``export``, ``fit`` and ``tune`` killed with SIGKILL at chosen moments, then run again.

Nothing here raises an exception to stand for a kill: every run is a child process that is sent
``SIGKILL``, so no ``finally``, ``except`` or exit handler of it runs, exactly as after an
out-of-memory kill or a lost machine.

The children are forked by one launcher process (``python -m tests.test_faults``) that imports
the package once: a fresh interpreter would spend seconds importing torch, Lightning and diffusers
before every one of the dozens of runs. A forked child is an ordinary process running the command
line's ``main`` with its own arguments, working folder and log file; the test process kills it by
its pid. The moments of the kills are drawn from a seeded generator over durations measured in
the test, or come when a checkpoint or a logged step appears; only the export's rename window is
reached by pausing the child (a wrapper installed in the child by this file, around the package's
folder exchange), because a timer lands in a window of microseconds too rarely. One test builds
the state a kill leaves in the latent cache directly, as that window is as narrow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from diffusion_lightning.utils.io import recover_directory
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

SMOKE = REPO / "configs" / "smoke"
SMOKE_SEARCH = REPO / "configs" / "search" / "smoke_ddpm_mnist.yaml"
#: Seconds one child may run before the test gives up on it.
CHILD_TIMEOUT = 120.0


# ---------------------------------------------------------------------- the launcher (a separate process)


def _pause_here(marker: str) -> NoReturn:
    """In a child: tell the test where it stands (by creating ``marker``), then wait to be killed."""
    Path(marker).touch()
    while True:
        time.sleep(60)


def _install_pause(pause: dict[str, str]) -> None:
    """In a child: stop at a moment of ``atomic_directory``'s replacement of an existing folder.

    ``before-swap``: the new folder is complete, the previous one still in place. ``after-swap``:
    the new one is in place, the previous one not yet deleted. ``between-renames``: on a file
    system without an atomic exchange, after the previous folder was moved aside and before the
    new one is moved in.
    """
    from diffusion_lightning.utils import io

    at, marker = pause["at"], pause["marker"]
    exchange = io._exchange
    if at == "before-swap":

        def pause_then_exchange(a: Path, b: Path) -> bool:
            _pause_here(marker)

        io._exchange = pause_then_exchange
    elif at == "after-swap":

        def exchange_then_pause(a: Path, b: Path) -> bool:
            if exchange(a, b):
                _pause_here(marker)
            return False

        io._exchange = exchange_then_pause
    elif at == "between-renames":
        io._exchange = lambda a, b: False  # a file system that cannot exchange two folders
        replace = os.replace

        def replace_then_pause(src: Any, dst: Any) -> None:
            replace(src, dst)
            if Path(dst).name.startswith(f".{Path(src).name}.old-"):
                _pause_here(marker)

        os.replace = replace_then_pause
    else:
        raise ValueError(f"pause at={at!r}: expected before-swap, after-swap or between-renames.")


def _run_child(job: dict[str, Any]) -> None:
    """In a forked child: run the command line's ``main`` on the job's arguments, then exit."""
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(job["cwd"])
        os.umask(int(job.get("umask", 0o022)))
        if job.get("pause"):
            _install_pause(job["pause"])
        from diffusion_lightning.cli import main

        try:
            main(job["argv"])
            code = 0
        except SystemExit as exit_:
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    """The launcher: import everything once, then fork a child for each job read from stdin.

    It answers each job with ``{"pid": ...}`` and each child's end with ``{"exited": pid, "status": code}``
    (``-9`` for SIGKILL). It starts no thread, so forking is safe.
    """
    import select

    import diffusers  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import optuna  # noqa: F401
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DModel  # noqa: F401

    import diffusion_lightning.callbacks  # noqa: F401
    import diffusion_lightning.cli  # noqa: F401
    import diffusion_lightning.commands.export  # noqa: F401
    import diffusion_lightning.tuning  # noqa: F401

    def say(message: dict[str, Any]) -> None:
        os.write(1, (json.dumps(message) + "\n").encode())

    say({"ready": threading.active_count()})
    pending, running, open_ = b"", 0, True
    while open_ or running:
        if open_ and select.select([0], [], [], 0.01)[0]:
            data = os.read(0, 65536)
            open_ = bool(data)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _run_child(json.loads(line))
                running += 1
                say({"pid": pid})
        elif not open_:
            time.sleep(0.01)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running -= 1
            say({"exited": pid, "status": os.waitstatus_to_exitcode(status)})


# ---------------------------------------------------------------------- the launcher (from the tests)


@dataclass
class Child:
    pid: int
    log: Path

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


class Launcher:
    """Starts children through the launcher process and kills them with SIGKILL."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_faults"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.started: queue.Queue[dict[str, Any]] = queue.Queue()
        self.exited: dict[int, int] = {}
        self.children: list[Child] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.started.get(timeout=180.0)
        assert ready.get("ready") == 1, f"the launcher runs threads before forking: {ready}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "exited" in message:
                with self.changed:
                    self.exited[message["exited"]] = message["status"]
                    self.changed.notify_all()
            else:
                self.started.put(message)
        self.started.put({"gone": self.process.wait()})

    def start(
        self,
        argv: Sequence[str],
        cwd: Path,
        log: Path,
        pause: dict[str, str] | None = None,
        umask: int = 0o022,
    ) -> Child:
        job = {"argv": list(argv), "cwd": str(cwd), "log": str(log), "pause": pause, "umask": umask}
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        self.process.stdin.flush()
        answer = self.started.get(timeout=30.0)
        assert "pid" in answer, f"the launcher is gone: {answer}"
        child = Child(int(answer["pid"]), log)
        self.children.append(child)
        return child

    def status(self, child: Child) -> int | None:
        """The child's exit code once it has ended (``-9`` when it was killed), else ``None``."""
        with self.changed:
            return self.exited.get(child.pid)

    def wait(self, child: Child, timeout: float = CHILD_TIMEOUT) -> int:
        """Wait for the child's end; its exit code (``-9`` when it was killed)."""
        with self.changed:
            if self.changed.wait_for(lambda: child.pid in self.exited, timeout):
                return self.exited[child.pid]
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        pytest.fail(f"{child.pid} ran past {timeout}s and was killed:\n{child.tail()}")

    def kill(self, child: Child) -> int:
        """SIGKILL the child (wherever it is: it may have ended already) and wait for it."""
        if self.status(child) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        return self.wait(child)

    def check(self, child: Child, argv: Sequence[str] = ()) -> Child:
        """Wait for the child's end; it must succeed."""
        status = self.wait(child)
        assert status == 0, f"{' '.join(argv)} exited with {status}:\n{child.tail()}"
        return child

    def run(self, argv: Sequence[str], cwd: Path, log: Path, **kwargs: Any) -> Child:
        """Run a child to its end; it must succeed."""
        return self.check(self.start(argv, cwd, log, **kwargs), argv)

    def close(self) -> None:
        """Kill the children still running (a failed test may leave one), then end the launcher."""
        for child in self.children:
            if self.status(child) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


def wait_for(
    condition: Callable[[], Any], child: Child, launcher: Launcher, timeout: float = 60.0, may_end: bool = False
) -> Any:
    """Poll ``condition`` every few milliseconds until it is truthy.

    If the child ends first, fails, or returns ``None`` when ``may_end``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        status = launcher.status(child)
        if status is not None and may_end:
            return None
        if status is not None:
            pytest.fail(f"the child exited ({status}) before the moment to kill it:\n{child.tail()}")
        time.sleep(0.005)
    launcher.kill(child)
    pytest.fail(f"the moment to kill the child never came within {timeout}s:\n{child.tail()}")


# ---------------------------------------------------------------------- export


def ddpm_checkpoint(path: Path, seed: int) -> Path:
    """A checkpoint of a tiny DDPM trained one step from the initialisation of ``seed``."""
    torch.manual_seed(seed)
    model = tiny_ddpm()
    trainer = quiet_trainer(path.parent / f"run{seed}", max_steps=1, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(RandomDigits(8), batch_size=4))
    trainer.save_checkpoint(path)
    return path


def pipeline_fingerprint(folder: Path) -> tuple[str, str]:
    """``(scheduler class, hash of every UNet weight)`` of the pipeline ``folder`` (which must load)."""
    from diffusion_lightning import ClassConditionedPipeline

    listing = sorted(p.name for p in folder.parent.iterdir())
    assert (folder / "model_index.json").is_file(), f"{folder} holds no pipeline; beside it: {listing}"
    pipe = ClassConditionedPipeline.from_pretrained(folder)
    digest = hashlib.sha256()
    for name, value in sorted(pipe.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.numpy().tobytes())
    return type(pipe.scheduler).__name__, digest.hexdigest()


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory) -> list[list[str]]:
    """The arguments of two exports whose pipelines differ in weights and scheduler."""
    root = tmp_path_factory.mktemp("ckpts")
    return [
        ["--ckpt", str(ddpm_checkpoint(root / "a.ckpt", 0)), "--scheduler", "ddim"],
        ["--ckpt", str(ddpm_checkpoint(root / "b.ckpt", 1)), "--scheduler", "dpm"],
    ]


def can_exchange_folders(tmp_path: Path) -> bool:
    """Whether this system and file system swap two folders in one step (else ``atomic_directory`` renames twice)."""
    from diffusion_lightning.utils import io

    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return io._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != name)


def test_export_killed_at_any_moment_leaves_the_old_or_the_new_pipeline(launcher, two_exports, tmp_path):
    """23 exports over an existing pipeline, each killed: 8 at seeded moments from the start, 12 at seeded moments
    after the new folder began to be written, 3 paused inside the replacement; after each the folder loads."""
    out = tmp_path / "pipes" / "pipe"
    out.parent.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()

    def export(index: int, n: int, **kwargs: Any) -> Child:
        argv = ["export", *two_exports[index], "--out", str(out), "--overwrite"]
        return launcher.start(argv, tmp_path, logs / f"{n:02d}.log", **kwargs)

    def writing(child: Child) -> Callable[[], bool]:  # the child's new folder has appeared beside OUT
        return lambda: any(p.name.startswith(f".pipe.partial-{child.pid}-") for p in out.parent.iterdir())

    # the two pipelines, each exported once to the end (the second over the first), timed
    fingerprints = []
    for index in (0, 1):
        started = time.monotonic()
        assert launcher.wait(export(index, index)) == 0
        duration = time.monotonic() - started
        first_file = min(p.stat().st_mtime for p in out.rglob("*") if p.is_file())  # written in the new folder
        write_phase = max(time.time() - first_file, 0.001)
        fingerprints.append(pipeline_fingerprint(out))
    assert fingerprints[0] != fingerprints[1]
    assert leftovers(out.parent, "pipe") == []
    assert out.stat().st_mode & 0o777 == 0o755  # the umask's, not mkdtemp's 0o700

    rng = random.Random(0)
    moments: list[tuple[str, float]] = [("start", rng.uniform(0, 1.2 * duration)) for _ in range(8)]
    moments += [("writing", rng.uniform(0, 1.2 * write_phase)) for _ in range(12)]
    moments += [("before-swap", 0.0), ("after-swap", 0.0), ("between-renames", 0.0)]
    if not can_exchange_folders(tmp_path):  # the package falls back to two renames: the last moment is its window
        moments = [(moment, delay) for moment, delay in moments if moment not in ("before-swap", "after-swap")]
    rng.shuffle(moments)
    current = 1
    outcomes = {"old": 0, "new": 0}
    for n, (moment, delay) in enumerate(moments, start=2):
        target = 1 - current
        marker = tmp_path / f"paused-{n}"
        pause = None if moment in ("start", "writing") else {"at": moment, "marker": str(marker)}
        child = export(target, n, pause=pause)
        if moment == "writing":
            wait_for(writing(child), child, launcher, may_end=True)
        elif pause is not None:
            wait_for(marker.exists, child, launcher)
        time.sleep(delay)
        status = launcher.kill(child)
        assert status in (0, -signal.SIGKILL), child.tail()

        if moment == "between-renames":  # no atomic exchange: the next writer moves the previous folder back
            assert not out.exists()
            recover_directory(out)
        found = pipeline_fingerprint(out)  # loads, whatever the moment
        assert found in fingerprints, f"kill {n} ({moment} + {delay:.3f}s): a pipeline that is neither"
        if moment == "before-swap" or moment == "between-renames":
            assert found == fingerprints[current]
        if moment == "after-swap":
            assert found == fingerprints[target]
        outcomes["new" if found == fingerprints[target] else "old"] += 1
        current = fingerprints.index(found)
        # only the killed child's leftovers remain: the next export removed the earlier ones
        assert all(str(child.pid) in name for name in leftovers(out.parent, "pipe")), leftovers(out.parent, "pipe")

    assert outcomes["old"] >= 3 and outcomes["new"] >= 2, outcomes  # the moments spread over the export
    launcher.check(export(1 - current, len(moments) + 2))
    assert pipeline_fingerprint(out) == fingerprints[1 - current]
    assert leftovers(out.parent, "pipe") == []


# ---------------------------------------------------------------------- fit, killed and resumed

#: Keep every checkpoint (``stepNNN.ckpt``) besides ``last.ckpt``, so the test sees how far a run got.
KEEP_CHECKPOINTS = [
    "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "-1", "--checkpoint.filename", "step{step:03d}",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
#: What differs between two runs of one configuration in other folders: paths, and Lightning's version string.
RUN_SPECIFIC = {"hyper_parameters", "hparams_name", "pytorch-lightning_version"}


def fit_argv(root: Path, config: Sequence[str], every: int, resume: bool = False) -> list[str]:
    """The ``fit`` command line of a run in ``root`` (``{root}`` in ``config`` stands for it)."""
    config = [arg.replace("{root}", str(root)) for arg in config]
    argv = ["fit", *config, "--trainer.default_root_dir", str(root), *KEEP_CHECKPOINTS]
    argv += ["--checkpoint.every_n_train_steps", str(every)]
    return [*argv, "--ckpt_path", "last"] if resume else argv


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ: tensors bit for bit, containers entry by entry."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}/{key} (only in one)" for key in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b), key=str):
            found += differences(a[key], b[key], f"{where}/{key}")
        return found
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [where]


def training_state(path: Path) -> dict[str, Any]:
    """The checkpoint without what names its run (paths, versions): weights, optimizer, EMA, loops, RNG, data."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if k == "EMA"}
    return {k: v for k, v in state.items() if k not in RUN_SPECIFIC}


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def logged_steps(version: Path, tag: str = "train/loss") -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them: all event files of the version folder together."""
    events = EventAccumulator(str(version))
    events.Reload()
    return [event.step for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


class StepWatch:
    """The largest step a run has logged ``tag`` at so far, read from its event files as they grow (cheap to poll)."""

    def __init__(self, version: Path, tag: str = "train/loss") -> None:
        self.version, self.tag = version, tag
        self.loaders: dict[Path, Any] = {}
        self.latest = -1

    def __call__(self) -> int:
        for path in sorted(self.version.glob("events.out.tfevents.*")):
            loader = self.loaders.setdefault(path, EventFileLoader(str(path)))
            for event in loader.Load():
                if any(value.tag == self.tag for value in event.summary.value):
                    self.latest = max(self.latest, event.step)
        return self.latest


def kill_and_resume(
    launcher: Launcher, tmp_path: Path, config: Sequence[str], every: int, kill_when: Callable[[Path], Any]
) -> dict[str, Any]:
    """Fit to the end; fit again, SIGKILL it when ``kill_when(root)``, resume it (``--ckpt_path last``) to the end."""
    reference, root = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = launcher.start(fit_argv(reference, config, every), tmp_path, tmp_path / "reference.log")
    child = launcher.start(fit_argv(root, config, every), tmp_path, tmp_path / "killed.log")
    wait_for(lambda: kill_when(root), child, launcher)
    assert launcher.kill(child) == -signal.SIGKILL, child.tail()
    launcher.check(uninterrupted)
    resumed_from = checkpoint_step(root / "checkpoints" / "last.ckpt")
    resumed = launcher.run(fit_argv(root, config, every, resume=True), tmp_path, tmp_path / "resumed.log")
    return {
        "reference": reference,
        "root": root,
        "resumed_from": resumed_from,
        "log": resumed.log.read_text(errors="replace"),
    }


def assert_same_training_state(run: dict[str, Any]) -> None:
    """The resumed run ended with the uninterrupted run's state, bit for bit, and knew its loader resumes."""
    assert "not resumable" not in run["log"]  # Lightning's warning about a loader without state_dict
    expected = training_state(run["reference"] / "checkpoints" / "last.ckpt")
    found = training_state(run["root"] / "checkpoints" / "last.ckpt")
    assert found["global_step"] == expected["global_step"]
    assert differences(found, expected) == []


def test_ddpm_fit_killed_and_resumed_equals_the_uninterrupted_run(launcher, tmp_path):
    # 2 epochs of 6 steps, validated after each; checkpoints at steps 4 and 8 (and at the validations)
    config = ["--config", str(SMOKE / "ddpm_mnist.yaml"), "--trainer.limit_train_batches", "6"]
    watch: StepWatch | None = None

    def past_the_checkpoint(root: Path) -> bool:  # steps logged after the step-8 checkpoint: the resume replays them
        nonlocal watch
        if not (root / "checkpoints" / "step008.ckpt").exists():
            return False
        watch = watch or StepWatch(root / "lightning_logs" / "version_0")
        return watch() >= 8

    run = kill_and_resume(launcher, tmp_path, config, 4, past_the_checkpoint)
    assert run["resumed_from"] == 8  # mid-epoch 2
    assert_same_training_state(run)
    version = run["root"] / "lightning_logs" / "version_0"
    assert len(list(version.glob("events.out.tfevents.*"))) == 2  # the killed run's and the resumed run's
    assert logged_steps(version) == list(range(12))  # each step once, the replayed ones from the resumed run
    val_steps = logged_steps(version, "val/loss")
    assert len(val_steps) == 2 and val_steps == sorted(set(val_steps))
    assert logged_steps(version) == logged_steps(run["reference"] / "lightning_logs" / "version_0")


def test_latent_lora_ema_caches_fit_killed_and_resumed_equals_the_uninterrupted_run(launcher, tmp_path):
    config = [
        "--config", str(SMOKE / "sd_tiny.yaml"), "--trainer.max_epochs", "2",
        "--model.init_args.latent_cache_dir", "{root}/latents",
        "--model.init_args.text_embedding_cache_dir", "{root}/text",
        "--trainer.callbacks+=diffusion_lightning.callbacks.EMA", "--trainer.callbacks.decay", "0.9",
    ]  # fmt: skip
    run = kill_and_resume(launcher, tmp_path, config, 1, lambda root: (root / "checkpoints" / "step006.ckpt").exists())
    assert run["resumed_from"] in (5, 6, 7)  # mid-epoch 2 of 4 steps
    assert_same_training_state(run)


def test_a_latent_cache_batch_half_written_by_a_killed_run_gives_the_uninterrupted_latents(tmp_path):
    from diffusion_lightning.nets.latent import build_components
    from diffusion_lightning.utils.latent_cache import LatentCache

    vae = build_components({"seed": 0})["vae"].eval()
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = [f"image-{i}" for i in range(8)]

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(x).latent_dist.parameters

    uninterrupted = LatentCache(tmp_path / "a", "vae").get(images, keys, encode)
    # what a run killed while writing the batch's entries (one file each) leaves: the first seven
    resumed = LatentCache(tmp_path / "b", "vae")
    for source, target in zip(LatentCache(tmp_path / "a", "vae").paths(keys, 16, 16)[:7], resumed.paths(keys, 16, 16)):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    assert torch.equal(resumed.get(images, keys, encode), uninterrupted)
    assert torch.equal(resumed.get(images, keys, encode), uninterrupted)  # now read from the cache


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A small 28x28 MNIST teacher pipeline for the distillation configs."""
    from diffusion_lightning import ClassConditionedPipeline
    from diffusion_lightning.nets import UNetConfig, build_unet
    from diffusion_lightning.schedulers import make_scheduler, training_scheduler

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=(16, 32), norm_num_groups=4), sample_size=28, in_channels=1,
                      num_classes=10)  # fmt: skip
    scheduler = make_scheduler("ddim", training_scheduler(prediction_type="v_prediction"))
    folder = tmp_path_factory.mktemp("teacher") / "pipeline"
    ClassConditionedPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return str(folder)


def test_progressive_distillation_killed_mid_round_and_resumed_equals_the_uninterrupted_run(
    launcher, tmp_path, teacher
):
    config = [
        "--config", str(SMOKE / "progressive_distill.yaml"), "--model.init_args.teacher", teacher,
        "--model.init_args.steps_per_round", "4", "--trainer.max_steps", "8",
    ]  # fmt: skip
    run = kill_and_resume(launcher, tmp_path, config, 1, lambda root: (root / "checkpoints" / "step006.ckpt").exists())
    assert run["resumed_from"] in (5, 6, 7)  # mid-round 2 (steps 4 to 8)
    resumed = torch.load(run["root"] / "checkpoints" / f"step{run['resumed_from']:03d}.ckpt", weights_only=False)
    assert int(resumed["state_dict"]["round"]) == 1  # its teacher is round 1's: the student of round 0
    assert_same_training_state(run)
    for steps in (4, 2):  # each round's export, as in the uninterrupted run
        found = pipeline_fingerprint(run["root"] / "rounds" / f"steps={steps}")
        assert found == pipeline_fingerprint(run["reference"] / "rounds" / f"steps={steps}")


def test_knowledge_distillation_fit_killed_and_resumed_equals_the_uninterrupted_run(launcher, tmp_path, teacher):
    config = [
        "--config", str(SMOKE / "distill_students.yaml"), "--model.init_args.teacher", teacher,
        "--trainer.max_steps", "8", "--trainer.callbacks+=diffusion_lightning.callbacks.EMA",
        "--trainer.callbacks.decay", "0.9",
    ]  # fmt: skip
    run = kill_and_resume(launcher, tmp_path, config, 1, lambda root: (root / "checkpoints" / "step005.ckpt").exists())
    assert run["resumed_from"] in (4, 5, 6)
    assert_same_training_state(run)  # the student, its feature projections, the optimizer, the EMA


# ---------------------------------------------------------------------- tune, killed and run again


def test_tune_killed_mid_trial_and_run_again_completes_the_study(launcher, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from diffusion_lightning.tuning.study import ORPHANED

    out = tmp_path / "study"
    argv = [
        "tune", "--config", str(SMOKE / "ddpm_mnist.yaml"), "--search", str(SMOKE_SEARCH),
        "--n-trials", "3", "--seed", "7", "--out", str(out), "--skip-preflight",
    ]  # fmt: skip
    child = launcher.start(argv, tmp_path, tmp_path / "killed.log")
    watch = StepWatch(out / "trials" / "trial_1")
    wait_for(lambda: watch() >= 2, child, launcher)  # trial 0 has finished, trial 1 is training
    assert launcher.kill(child) == -signal.SIGKILL, child.tail()

    def trials() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="smoke_ddpm_mnist", storage=f"sqlite:///{out / 'study.db'}").get_trials()

    killed = trials()
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]  # what the kill left
    rerun = launcher.run(argv, tmp_path, tmp_path / "rerun.log")
    assert "2 finished trial(s), 1 to run" in rerun.tail()  # the killed trial counts as failed, trial 0 as done

    after = trials()
    assert [t.number for t in after] == [0, 1, 2]
    assert after[0].state == TrialState.COMPLETE
    assert (after[0].params, after[0].value, after[0].datetime_complete) == (
        killed[0].params,
        killed[0].value,
        killed[0].datetime_complete,
    )  # not run again
    assert after[1].state == TrialState.FAIL and after[1].user_attrs["error"] == ORPHANED
    assert after[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert (out / "best.yaml").is_file() and (out / "trials.csv").read_text().count("\n") == 4


if __name__ == "__main__":
    _serve()

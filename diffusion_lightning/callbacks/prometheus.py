"""Serve a fit's progress as Prometheus metrics over HTTP, for dashboards and alerts while it trains."""

from __future__ import annotations

import errno
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from diffusion_lightning.callbacks.throughput import batch_size
from diffusion_lightning.errors import UserError
from diffusion_lightning.utils.compat import should_update_logs

__all__ = ["DEFAULT_PORT", "PrometheusMonitor", "metric_name"]

#: The default port: outside 9100-9999, the range Prometheus allocates to exporters (all taken), and away
#: from the ports of TensorBoard (6006), Gradio (7860), Jupyter (8888) and the usual 8000/8080.
DEFAULT_PORT = 8491

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_MAXRSS_IN_BYTES = sys.platform == "darwin"  # ru_maxrss: bytes on macOS, KiB on Linux and the BSDs


def metric_name(text: str) -> str:
    """``text`` as a valid Prometheus metric name: other characters become ``_``; a leading digit gets ``_``."""
    name = _INVALID.sub("_", text)
    return f"_{name}" if not name or name[0].isdigit() else name


def _require_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "PrometheusMonitor needs prometheus_client: pip install 'diffusion-lightning[prometheus]'."
        ) from err


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is a number or a one-element tensor, else ``None``."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class PrometheusMonitor(Callback):
    """Serve the progress of a ``fit`` at ``http://<addr>:<port>/metrics`` in Prometheus' text format.

    Lightning has loggers for files and tracking services, which are written to, but none for
    Prometheus, which scrapes: this callback keeps the values in ``prometheus_client`` gauges of its
    own ``CollectorRegistry`` (not the process-wide one, so several fits in one process do not clash)
    and serves them with ``prometheus_client.start_http_server`` from when fitting is set up to its
    teardown, also when it raises: the port is free again after the fit.

    Exported (``<prefix>`` is ``prefix``, ``diffusion_lightning`` by default):

    - ``<prefix>_global_step`` and ``<prefix>_epoch``: the Trainer's, set after every training batch
      and at every epoch start; ``<prefix>_train_samples_total``: the samples trained on (counted by
      ``batch_size_fn``).
    - ``<prefix>_metric{name="..."}``: every scalar the loggers recorded, under its logged name
      (``train/loss``, ``val/loss``, ``diffusion/loss_t000-099``, ``train/device/samples_per_sec`` of
      Lightning's ``ThroughputMonitor``, ``DeviceStatsMonitor``'s statistics...), read from
      ``trainer.logged_metrics`` (``trainer.callback_metrics`` when the Trainer has no logger) once the
      Trainer has handed them to its loggers: the values are the ones the loggers recorded. The names
      are label values, so they are kept as logged; only ``prefix`` becomes part of a metric name, made
      valid by :func:`metric_name`.
    - ``<prefix>_evaluation{name="..."}``: the last value of each of those whose name starts with one
      of ``evaluation_prefixes`` (``evals/fid``, ``evals/accuracy`` of
      :class:`~diffusion_lightning.callbacks.PeriodicEvaluation`; ``generation/seconds_per_image`` of
      :class:`~diffusion_lightning.callbacks.GenerationMonitor`) and
      ``<prefix>_evaluation_global_step``, the step at which one of them last changed.
    - ``<prefix>_learning_rate{optimizer="0",param_group="0"}``: read from the optimizers at the start
      of each logging step, as Lightning's ``LearningRateMonitor`` does (the value it logs at that step).
    - ``<prefix>_steps_per_second`` and ``<prefix>_samples_per_second``: optimizer steps and samples
      per second of training since the previous logging step (validation time left out).
    - ``<prefix>_process_resident_memory_bytes`` (with ``psutil``, a dependency of ``peft``) and
      ``<prefix>_process_peak_resident_memory_bytes`` (from ``resource``, where it exists); on a CUDA
      device ``<prefix>_cuda_memory_allocated_bytes`` and ``<prefix>_cuda_max_memory_allocated_bytes``.
    - ``<prefix>_global_rank``: the process's rank, to tell the ranks' endpoints apart.

    Work per training batch is a few gauge sets and ``batch_size_fn``; rates, memory and learning rates
    are read at the logging steps (the Trainer's ``log_every_n_steps``) only, the logged metrics once
    after each flush to the loggers. A scrape example (``prometheus.yml``)::

        scrape_configs:
          - job_name: diffusion_lightning
            static_configs: [{targets: ["127.0.0.1:8491"]}]

    Args:
        port: TCP port of the endpoint (default :data:`DEFAULT_PORT`, 8491: outside the exporters' range
            9100-9999); ``0`` picks a free one (read :attr:`url`).
        addr: Address to listen on; ``127.0.0.1`` serves this machine only, ``0.0.0.0`` every interface.
        rank_zero_only: Serve from the global rank 0 only (its metrics are those of the loggers). When
            ``False``, every rank serves its own values on ``port + global_rank`` (rank 1 on 8492...).
        prefix: Start of every metric name.
        evaluation_prefixes: Logged names exported as evaluation metrics too.
        batch_size_fn: Counts the samples of a training batch (default
            :func:`~diffusion_lightning.callbacks.throughput.batch_size`).

    Raises:
        ImportError: ``prometheus_client`` is not installed (the ``prometheus`` extra).
        UserError: When fitting starts, if the port is in use (or may not be bound).
    """

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        addr: str = "127.0.0.1",
        rank_zero_only: bool = True,
        prefix: str = "diffusion_lightning",
        evaluation_prefixes: Sequence[str] = ("evals/", "generation/"),
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise UserError(f"port={port!r} is not accepted; expected an int from 0 to 65535 (0: a free port).")
        if not prefix:
            raise UserError(
                "prefix='' is not accepted; expected the start of the metric names, e.g. 'diffusion_lightning'."
            )
        _require_client()
        self.port = port
        self.addr = addr
        self.rank_zero_only = rank_zero_only
        self.prefix = metric_name(prefix)
        self.evaluation_prefixes = tuple(evaluation_prefixes)
        self.batch_size_fn = batch_size_fn or batch_size
        self.registry: Any = None
        """The ``CollectorRegistry`` of the current (or last) fit; ``None`` before the first."""
        self.bound_port: int | None = None
        """The port served on while fitting (``port + global_rank`` with ``rank_zero_only=False``)."""
        self._server: Any = None
        self._thread: Any = None
        self._gauges: dict[str, Any] = {}
        self._pending = False  # metrics went to the loggers after the last read
        self._evaluation: dict[str, float] = {}
        self._t0: float | None = None  # start of the current rate window
        self._paused: float | None = None  # when validation started inside the window
        self._steps0 = 0
        self._samples = 0
        self._samples0 = 0

    # ------------------------------------------------------------------ the server

    def serving_port(self, global_rank: int) -> int | None:
        """The port the process of rank ``global_rank`` serves on, ``None`` if it serves nothing."""
        if global_rank != 0 and self.rank_zero_only:
            return None
        return self.port + global_rank if self.port else 0

    @property
    def url(self) -> str | None:
        """The scrape address while fitting, ``None`` when not serving."""
        if self._server is None:
            return None
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.bound_port}/metrics"

    def _start(self, trainer: pl.Trainer) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self._stop()  # one left by an earlier fit that did not tear down
        port = self.serving_port(trainer.global_rank)
        if port is None:
            return
        self.registry = CollectorRegistry(auto_describe=True)
        self._build_gauges(trainer)
        try:
            self._server, self._thread = start_http_server(port, addr=self.addr, registry=self.registry)
        except OSError as err:
            if err.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise
            where = f"{self.addr}:{port}" + (
                "" if self.rank_zero_only else f" (port + global rank {trainer.global_rank})"
            )
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    f"PrometheusMonitor: addr={self.addr!r} is not accepted: cannot serve on {where} ({err.strerror}); "
                    "set the callback's addr to an address of this machine, e.g. 127.0.0.1 or 0.0.0.0."
                ) from err
            raise UserError(
                f"PrometheusMonitor: port={self.port!r} is not accepted: cannot serve on {where} ({err.strerror}); "
                "set the callback's port to a free one (0: any free port), or stop the process that holds it."
            ) from err
        self.bound_port = self._server.server_port
        self._pending = False
        self._evaluation = {}
        self._t0 = self._paused = None
        self._samples = self._samples0 = self._steps0 = 0

    def _stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def _build_gauges(self, trainer: pl.Trainer) -> None:
        from prometheus_client import Counter, Gauge

        p, registry = self.prefix, self.registry

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return Gauge(f"{p}_{name}", doc, labelnames=labels, registry=registry)

        self._gauges = {
            "global_step": gauge("global_step", "Optimizer steps taken (trainer.global_step)."),
            "epoch": gauge("epoch", "Current training epoch (trainer.current_epoch)."),
            "samples": Counter(f"{p}_train_samples", "Training samples seen in this fit.", registry=registry),
            "metric": gauge("metric", "A scalar the loggers recorded, by its logged name.", ["name"]),
            "evaluation": gauge("evaluation", "The last value of an evaluation metric, by its logged name.", ["name"]),
            "evaluation_step": gauge("evaluation_global_step", "Global step of the last evaluation metrics."),
            "lr": gauge("learning_rate", "Learning rate of a parameter group.", ["optimizer", "param_group"]),
            "steps_per_s": gauge("steps_per_second", "Optimizer steps per second since the previous logging step."),
            "samples_per_s": gauge("samples_per_second", "Samples per second since the previous logging step."),
            "rss": gauge("process_resident_memory_bytes", "Resident memory of the process."),
            "peak_rss": gauge("process_peak_resident_memory_bytes", "Peak resident memory of the process."),
            "rank": gauge("global_rank", "Global rank of the process serving these metrics."),
        }
        if trainer.strategy.root_device.type == "cuda":
            self._gauges["cuda"] = gauge("cuda_memory_allocated_bytes", "CUDA memory allocated by tensors.")
            self._gauges["cuda_peak"] = gauge("cuda_max_memory_allocated_bytes", "Peak CUDA memory allocated.")
        self._gauges["rank"].set(trainer.global_rank)

    @property
    def _serving(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------------ reading values

    def _read_logged(self, trainer: pl.Trainer) -> None:
        """Copy every scalar the loggers recorded (``callback_metrics`` without loggers) into the gauges."""
        self._pending = False
        metrics = trainer.logged_metrics if trainer.loggers else trainer.callback_metrics
        changed = False
        for name, raw in list(metrics.items()):
            value = _scalar(raw)
            if value is None:
                continue
            self._gauges["metric"].labels(name=name).set(value)
            if name.startswith(self.evaluation_prefixes) and not _same(self._evaluation.get(name), value):
                self._evaluation[name] = value
                self._gauges["evaluation"].labels(name=name).set(value)
                changed = True
        if changed:
            self._gauges["evaluation_step"].set(trainer.global_step)

    def _read_learning_rates(self, trainer: pl.Trainer) -> None:
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                lr = _scalar(group.get("lr"))
                if lr is not None:
                    self._gauges["lr"].labels(optimizer=str(i), param_group=str(j)).set(lr)

    def _read_rates(self, trainer: pl.Trainer) -> None:
        now = time.perf_counter()
        if self._t0 is not None and now > self._t0:
            elapsed = now - self._t0
            self._gauges["steps_per_s"].set((trainer.global_step - self._steps0) / elapsed)
            self._gauges["samples_per_s"].set((self._samples - self._samples0) / elapsed)
        self._t0, self._steps0, self._samples0 = now, trainer.global_step, self._samples

    def _read_memory(self, trainer: pl.Trainer) -> None:
        try:
            import psutil
        except ImportError:
            pass
        else:
            self._gauges["rss"].set(psutil.Process().memory_info().rss)
        try:
            import resource
        except ImportError:  # not on Windows
            pass
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._gauges["peak_rss"].set(peak if _MAXRSS_IN_BYTES else peak * 1024)
        if "cuda" in self._gauges:
            device = trainer.strategy.root_device
            self._gauges["cuda"].set(torch.cuda.memory_allocated(device))
            self._gauges["cuda_peak"].set(torch.cuda.max_memory_allocated(device))

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._start(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._serving:
            self._gauges["global_step"].set(trainer.global_step)
            self._read_rates(trainer)
            self._read_memory(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._serving:
            self._gauges["epoch"].set(trainer.current_epoch)
            self._read_logged(trainer)  # the previous epoch's epoch-level values

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._serving:
            return
        if self._pending:
            self._read_logged(trainer)
        if should_update_logs(trainer):
            self._read_learning_rates(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._serving:
            return
        samples = self.batch_size_fn(batch)
        self._samples += samples
        self._gauges["samples"].inc(samples)
        self._gauges["global_step"].set(trainer.global_step)
        if should_update_logs(trainer):  # the Trainer hands this step's metrics to the loggers next
            self._pending = True
            self._read_rates(trainer)
            self._read_memory(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._serving and not trainer.sanity_checking:
            self._paused = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._serving or trainer.sanity_checking:
            return
        if self._paused is not None and self._t0 is not None:
            self._t0 += time.perf_counter() - self._paused
        self._paused = None
        self._read_logged(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._serving:
            self._gauges["global_step"].set(trainer.global_step)
            self._read_logged(trainer)
            self._read_memory(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._stop()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()


def _same(a: float | None, b: float) -> bool:
    return a is not None and (a == b or (math.isnan(a) and math.isnan(b)))

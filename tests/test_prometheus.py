"""PrometheusMonitor scraped over HTTP while a tiny model trains; Lightning's ThroughputMonitor in the stacks."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, Logger
from prometheus_client.parser import text_string_to_metric_families

from diffusion_lightning.callbacks import PrometheusMonitor, batch_size
from diffusion_lightning.cli import main
from diffusion_lightning.errors import UserError
from tests.conftest import REPO, RandomDigits, quiet_trainer, tiny_ddpm

PREFIX = "diffusion_lightning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served at ``url``: ``(name, sorted labels) -> value``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples, family: str, **labels) -> float:
    return samples[(f"{PREFIX}_{family}", tuple(sorted(labels.items())))]


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, in order: ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def last(self, name: str) -> tuple[int, float]:
        """The step and value of the last record of ``name``."""
        return next((step, m[name]) for step, m in reversed(self.records) if name in m)


class Scraper(Callback):
    """Scrape the monitor at the start of training batch ``at_step`` and when the second epoch starts."""

    def __init__(self, monitor: PrometheusMonitor, logger: MemoryLogger, at_step: int) -> None:
        self.monitor, self.logger, self.at_step = monitor, logger, at_step
        self.during: dict | None = None
        self.after_validation: dict | None = None
        self.seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self.during = scrape(self.monitor.url)
            self.seen["step"] = trainer.global_step
            self.seen["loss"] = self.logger.last("train/loss")
            self.seen["lr"] = {k: v for k, v in self.logger.records[-1][1].items() if k.startswith("lr-")}
            self.seen["lr_step"] = self.logger.records[-1][0]

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.after_validation = scrape(self.monitor.url)
            self.seen["val_loss"] = self.logger.last("val/loss")[1]


class FakeEvaluation(Callback):
    """Logs ``evals/score`` (the epoch + 0.5) at the end of each validation, as PeriodicEvaluation logs its scores."""

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("evals/score", trainer.current_epoch + 0.5, on_step=False, on_epoch=True)


def loaders():
    train = torch.utils.data.DataLoader(RandomDigits(32), batch_size=8)
    val = torch.utils.data.DataLoader(RandomDigits(16, seed=1), batch_size=8)
    return train, val


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A two-epoch fit of a tiny DDPM with the monitor on a free loopback port, scraped during the fit."""
    tmp_path = tmp_path_factory.mktemp("prometheus")
    torch.manual_seed(0)
    logger = MemoryLogger()
    monitor = PrometheusMonitor(port=free_port())
    scraper = Scraper(monitor, logger, at_step=5)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, log_every_n_steps=1, logger=[logger, CSVLogger(tmp_path)],
        callbacks=[LearningRateMonitor(logging_interval="step"), FakeEvaluation(), monitor, scraper],
    )  # fmt: skip
    trainer.fit(tiny_ddpm(), *loaders())
    return monitor, scraper, logger, trainer


def test_scraped_values_are_the_logged_ones(scraped):
    monitor, scraper, logger, trainer = scraped
    samples, seen = scraper.during, scraper.seen
    assert samples is not None and seen["step"] == 5
    assert metric(samples, "global_step") == 5 and metric(samples, "epoch") == 1
    # the step metrics of the last logging step (step 4: the 5th batch), as the loggers got them
    loss_step, loss = seen["loss"]
    assert loss_step == 4
    assert metric(samples, "metric", name="train/loss") == loss
    # LearningRateMonitor logged this step's rates just before: one per parameter group, in order
    assert seen["lr_step"] == 5 and seen["lr"]
    served = [metric(samples, "learning_rate", optimizer="0", param_group=str(i)) for i in range(len(seen["lr"]))]
    assert served == list(seen["lr"].values())
    assert len(set(served)) >= 1 and 0 < served[0] < 1e-2
    assert metric(samples, "train_samples_total") == 5 * 8
    assert metric(samples, "steps_per_second") > 0 and metric(samples, "samples_per_second") > 0
    assert metric(samples, "process_resident_memory_bytes") > 1e6
    assert metric(samples, "process_peak_resident_memory_bytes") > 1e6
    assert metric(samples, "global_rank") == 0
    assert not any(name.startswith(f"{PREFIX}_cuda") for name, _ in samples)  # a CPU run


def test_validation_metrics_after_the_first_epoch(scraped):
    _, scraper, _, _ = scraped
    samples = scraper.after_validation
    assert metric(samples, "metric", name="val/loss") == scraper.seen["val_loss"]
    assert metric(samples, "epoch") == 1 and metric(samples, "global_step") == 4
    assert metric(samples, "evaluation", name="evals/score") == 0.5
    assert metric(samples, "metric", name="evals/score") == 0.5
    assert metric(samples, "evaluation_global_step") == 4
    assert not any(labels == (("name", "val/loss"),) for name, labels in samples if name.endswith("_evaluation"))


def test_the_port_is_free_after_the_fit(scraped):
    monitor, *_ = scraped
    assert monitor.url is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{monitor.bound_port}/metrics", timeout=5)
    with socket.socket() as s:  # a new server may listen there (as Python's HTTP servers do: SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", monitor.bound_port))
        s.listen()


class Boom(RuntimeError):
    pass


class RaiseAt(Callback):
    def __init__(self, monitor: PrometheusMonitor) -> None:
        self.monitor = monitor
        self.scraped = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scraped = scrape(self.monitor.url)
        raise Boom("stop")


def test_the_port_is_freed_when_the_fit_raises_and_served_again(tmp_path):
    port = free_port()
    monitor = PrometheusMonitor(port=port)
    raiser = RaiseAt(monitor)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[monitor, raiser])
    with pytest.raises(Boom):
        trainer.fit(tiny_ddpm(), loaders()[0])
    assert raiser.scraped and monitor.url is None
    # the same callback serves the next fit on the same port, on a fresh registry
    probe = RaiseAt(monitor)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[monitor, probe])
    with pytest.raises(Boom):
        trainer.fit(tiny_ddpm(), loaders()[0])
    assert probe.scraped is not None and monitor.bound_port == port


def test_a_busy_port_is_a_clear_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monitor = PrometheusMonitor(port=port)
        trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[monitor])
        with pytest.raises(UserError, match=rf"port={port} is not accepted.*127\.0\.0\.1:{port}.*free one"):
            trainer.fit(tiny_ddpm(), loaders()[0])
    assert monitor.url is None


def test_an_address_of_another_machine_is_a_clear_error(tmp_path):
    monitor = PrometheusMonitor(port=0, addr="192.0.2.1")  # TEST-NET-1: no machine's own address
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[monitor])
    with pytest.raises(UserError, match=r"addr='192\.0\.2\.1' is not accepted"):
        trainer.fit(tiny_ddpm(), loaders()[0])


def test_ports_per_rank():
    assert PrometheusMonitor(port=9000).serving_port(0) == 9000
    assert PrometheusMonitor(port=9000).serving_port(3) is None  # rank_zero_only
    assert PrometheusMonitor(port=9000, rank_zero_only=False).serving_port(3) == 9003
    assert PrometheusMonitor(port=0, rank_zero_only=False).serving_port(3) == 0  # any free port


def test_no_logger_serves_the_callback_metrics_and_prefix(tmp_path):
    monitor = PrometheusMonitor(port=0, prefix="my-run")
    seen = {}

    class Probe(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.update(scrape(monitor.url))

    trainer = quiet_trainer(tmp_path, max_epochs=2, log_every_n_steps=1, callbacks=[monitor, Probe()])
    trainer.fit(tiny_ddpm(), loaders()[0])
    assert monitor.prefix == "my_run" and monitor.bound_port > 0
    assert ("my_run_metric", (("name", "train/loss"),)) in seen


@pytest.mark.parametrize("bad", [-1, 70000, True])
def test_bad_port_names_the_field(bad):
    with pytest.raises(UserError, match="port="):
        PrometheusMonitor(port=bad)


def test_batch_size_counts_this_packages_batches():
    assert batch_size({"images": torch.zeros(5, 1, 8, 8), "labels": torch.zeros(5)}) == 5
    assert batch_size({"captions": ["a", "b"], "keys": ["x", "y"]}) == 2
    assert batch_size({"other": torch.zeros(3, 2)}) == 3
    assert batch_size((torch.zeros(4, 2), torch.zeros(4))) == 4
    with pytest.raises(TypeError, match="keys"):
        batch_size({"name": "x"})


# ---------------------------------------------------------------------- Lightning's monitors in the stacks


def test_smoke_stack_logs_throughput_through_the_cli(tmp_path):
    """configs/smoke/callbacks.yaml as the CLI reads it: ThroughputMonitor's batch_size_fn is an import path."""
    config = yaml.safe_load((REPO / "configs/smoke/callbacks.yaml").read_text())
    keep = ("ThroughputMonitor", "DeviceStatsMonitor", "RunSummary")
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(keep)]
    monitor = {"class_path": "diffusion_lightning.callbacks.PrometheusMonitor", "init_args": {"port": 0}}
    config["trainer"]["callbacks"].append(monitor)  # it parses from YAML and runs beside them
    stack = tmp_path / "stack.yaml"
    stack.write_text(yaml.safe_dump(config))
    main([
        "fit", "--config", str(REPO / "configs/smoke/ddpm_mnist.yaml"), "--config", str(stack),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
    ])  # fmt: skip
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/samples", "train/batches", "train/device/samples_per_sec", "train/device/batches_per_sec"} <= set(
        header
    )
    assert "DeviceStatsMonitor.on_train_batch_end/cpu_percent" in header  # on CPU (psutil)


@pytest.mark.parametrize(
    "stack",
    ["configs/callbacks/default.yaml", "configs/callbacks/t2i.yaml", "configs/smoke/callbacks.yaml",
     "configs/smoke/callbacks_t2i.yaml"],
)  # fmt: skip
def test_stacks_hold_lightnings_monitors(stack):
    entries = {
        c["class_path"]: c.get("init_args", {})
        for c in yaml.safe_load((REPO / stack).read_text())["trainer"]["callbacks"]
    }
    assert entries["lightning.pytorch.callbacks.ThroughputMonitor"]["batch_size_fn"] == (
        "diffusion_lightning.callbacks.batch_size"
    )
    assert "lightning.pytorch.callbacks.DeviceStatsMonitor" in entries


def test_throughput_monitor_with_batch_size(tmp_path):
    logger = MemoryLogger()
    monitor = ThroughputMonitor(batch_size_fn=batch_size, window_size=2)
    trainer = quiet_trainer(tmp_path, max_epochs=1, log_every_n_steps=1, logger=logger, callbacks=[monitor])
    trainer.fit(tiny_ddpm(), loaders()[0])
    logged = {name: value for _, metrics in logger.records for name, value in metrics.items()}
    assert logged["train/samples"] == 32 and logged["train/device/samples_per_sec"] > 0

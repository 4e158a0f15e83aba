"""``diffusion-lightning app``, driven in a real headless browser (Debian chromium and chromedriver).

The project's digit judge (a :class:`~diffusion_lightning.DigitClassifier` trained briefly on the
embedded MNIST digits, applied through :class:`~diffusion_lightning.metrics.DigitFeatures` and
``judge_scores`` as ``evaluate`` applies it) picks one real digit each of 0, 1 and 4 that it reads
with confidence. A tiny class-conditioned DDPM memorises these three digits, shrunk from 28x28 to
14x14; the browser asks the app for each class with a fixed seed, the image is read back from the
page and the judge (which resizes it to 28x28, as in ``evaluate``) must read the digit asked for,
pixel for pixel the pipeline's own output for that seed. The Train tab starts a smoke fit, stops
it with a checkpoint, and the fit resumes from that checkpoint's step.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, quiet_trainer, tiny_ddpm

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DIGITS = (0, 1, 4)  # the digit of each class of the pipeline
CLASS_NAMES = ["zero", "one", "four"]
PIPELINE = "prototypes/pipeline"
CHECKPOINT = "prototypes/checkpoints/last.ckpt"
SMOKE_CONFIG = "smoke/ddpm_mnist.yaml"
SIZE = 14  # the pipeline draws the digits at half size (memorised in seconds); the judge resizes them to 28


def judge_reads(judge, images: torch.Tensor) -> list[int]:
    """The digits the judge reads in ``images`` (``(B, 1, H, W)`` in [0, 1]), as ``evaluate`` scores them."""
    from diffusion_lightning.metrics import judge_scores

    logits = judge.encode(images)["logits"]
    return judge_scores(logits, torch.zeros(len(logits), dtype=torch.long))["predicted"].tolist()


class Prototypes(torch.utils.data.Dataset):
    """``n`` slightly noisy copies of ``prototypes`` (``(3, 1, 28, 28)`` in [-1, 1]), the classes in turn."""

    def __init__(self, prototypes: torch.Tensor, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        noise = 0.05 * torch.randn(n, *prototypes.shape[1:], generator=g)
        self.images = (prototypes[self.labels] + noise).clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i], "labels": self.labels[i]}


def browser_unavailable() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return f"a headless browser is needed: {', '.join(missing)} missing (.ci/install-chromium installs them)"
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as error:
        return f"the app's test needs gradio and selenium ({error})"
    return None


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digit_judge(tmp_path_factory):
    """The digit judge, a small DigitClassifier trained for 200 steps on the embedded MNIST digits."""
    from diffusion_lightning import DigitClassifier, MNISTDataModule
    from diffusion_lightning.metrics import DigitFeatures

    torch.manual_seed(0)
    data = MNISTDataModule(source="embedded", batch_size=64)
    classifier = DigitClassifier(channels=(8, 16, 32), feature_dim=32, learning_rate=3e-3)
    quiet_trainer(tmp_path_factory.mktemp("judge"), max_steps=200, limit_val_batches=0).fit(classifier, data)
    return DigitFeatures(classifier)


@pytest.fixture(scope="module")
def prototypes(digit_judge) -> torch.Tensor:
    """Per :data:`DIGITS`, the real digit the judge reads most surely at ``SIZE``: ``(3, 1, 28, 28)`` in [-1, 1]."""
    from diffusion_lightning import MNISTDataModule

    images, labels = MNISTDataModule(source="embedded").load()["train"]
    images = images.float() / 255
    shrunk = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    probs = torch.cat([digit_judge.encode(batch)["logits"] for batch in shrunk.split(500)]).softmax(-1)
    chosen = []
    for digit in DIGITS:
        candidates = (labels == digit).nonzero().squeeze(1)
        best = candidates[probs[candidates, digit].argmax()]
        assert probs[best, digit] > 0.8, f"the judge reads no {digit} with confidence: it is undertrained"
        chosen.append(int(best))
    for prototype in (images[chosen], shrunk[chosen]):
        assert judge_reads(digit_judge, prototype) == list(DIGITS), "the judge misreads the prototypes"
    return images[chosen] * 2 - 1


@pytest.fixture(scope="module")
def root(tmp_path_factory, prototypes) -> Path:
    """The app's root, holding a class-conditioned pipeline that has memorised the prototypes at ``SIZE``."""
    root = tmp_path_factory.mktemp("app_root")
    torch.manual_seed(0)
    module = tiny_ddpm(
        image_size=SIZE,
        num_train_timesteps=100,
        prediction_type="sample",
        p_uncond=0.0,
        guidance_scale=1.0,
        learning_rate=5e-3,
        lr_scheduler=None,
        sampler="dpm",
        num_inference_steps=10,
        class_names=CLASS_NAMES,
    )
    small = torch.nn.functional.interpolate(prototypes, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    loader = torch.utils.data.DataLoader(Prototypes(small), batch_size=32, shuffle=True)
    trainer = quiet_trainer(root / "prototypes", max_steps=300)
    trainer.fit(module, loader)
    module.export_pipeline(root / PIPELINE)
    trainer.save_checkpoint(root / CHECKPOINT)
    return root


@pytest.fixture(scope="module")
def app(root):
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    from diffusion_lightning.app.command import AppArguments, build_app, launch

    demo = build_app(AppArguments(root=str(root), configs=str(REPO / "configs"), device="cpu"))
    _, url, _ = launch(demo, "127.0.0.1", 0, block=False)
    yield demo, url
    demo.training_job.stop()
    demo.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1100",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


# ---------------------------------------------------------------------- page helpers


def wait(predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except Exception:  # the page is still rendering: elements come and go
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    button = wait(lambda: driver.find_element(By.XPATH, f"//button[@role='tab'][contains(., '{name}')]"), what=name)
    button.click()
    time.sleep(0.3)


def choose(driver, elem_id: str, text: str) -> None:
    """Pick the option of the dropdown ``elem_id`` that ``text`` filters to."""
    from selenium.webdriver.common.keys import Keys

    box = wait(lambda: find(driver, f"#{elem_id} input"), what=elem_id)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)
    time.sleep(0.3)
    box.send_keys(Keys.ENTER)
    box.send_keys(Keys.ESCAPE)


def type_into(driver, css: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = wait(lambda: find(driver, css), what=css)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)


def page_image(src: str) -> torch.Tensor:
    """The image at ``src`` (the page's URL of it) as a ``(1, H, W)`` tensor in [0, 1]."""
    import numpy as np
    import PIL.Image

    with urllib.request.urlopen(src, timeout=10) as response:
        image = PIL.Image.open(io.BytesIO(response.read())).convert("L")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def gallery_sources(driver, elem_id: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")]


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


# ---------------------------------------------------------------------- tests


def test_generate_draws_the_class_asked_for_with_the_seed_given(app, driver, root, digit_judge, tmp_path):
    from selenium.webdriver.common.by import By

    from diffusion_lightning.modules.loading import load_pipeline_source

    _, url = app
    reference, defaults = load_pipeline_source(pipeline=root / PIPELINE)
    reference.set_progress_bar_config(disable=True)
    driver.get(url)
    open_tab(driver, "Generate")
    choose(driver, "gen-source", PIPELINE)
    wait(lambda: "four" in find(driver, "#gen-class").text, what="the class names")
    seed = 7
    type_into(driver, "#gen-seed input", str(seed))
    seen: set[str] = set()
    for k, name in enumerate(CLASS_NAMES):
        label = wait(
            lambda name=name: driver.find_element(By.XPATH, f"//*[@id='gen-class']//label[contains(., '{name}')]")
        )
        label.click()
        find(driver, "#gen-run").click()
        src = wait(
            lambda: [s for s in gallery_sources(driver, "gen-gallery-a") if s and s not in seen], 60, "an image"
        )[0]
        seen.add(src)
        shown = page_image(src)
        [read] = judge_reads(digit_judge, shown[None])
        assert read == DIGITS[k], f"asked for {name} (a {DIGITS[k]}), the judge reads a {read}"
        expected = reference(
            class_labels=[k],
            num_inference_steps=defaults["steps"],
            guidance_scale=defaults["guidance_scale"],
            generator=[torch.Generator().manual_seed(seed)],
            output_type="pt",
        ).images[0]
        assert shown.shape == expected.shape
        assert (shown - expected).abs().max() <= 1 / 255 + 1e-6, "the page's image is not the pipeline's for this seed"
    assert "s per image" in find(driver, "#gen-timing").text

    # side by side: a second source draws on the same seeds
    choose(driver, "gen-compare", PIPELINE)
    find(driver, "#gen-run").click()
    compared = wait(lambda: gallery_sources(driver, "gen-gallery-b"), 60, "the compared images")[0]
    assert torch.equal(page_image(compared), shown)
    driver.save_screenshot(os.fspath(tmp_path / "generate.png"))
    assert (tmp_path / "generate.png").stat().st_size > 0


def test_train_starts_refuses_a_second_start_stops_with_a_checkpoint_that_resumes(app, driver, root, tmp_path):
    from diffusion_lightning.modules.loading import read_checkpoint

    _, url = app
    driver.get(url)
    open_tab(driver, "Train")
    choose(driver, "train-config", SMOKE_CONFIG)
    type_into(driver, "#train-run-name textarea, #train-run-name input", "smoke_run")
    type_into(driver, "#train-overrides textarea", "--trainer.max_epochs 1000 --trainer.enable_progress_bar false")
    find(driver, "#train-start").click()

    def step() -> int:
        text = find(driver, "#train-status textarea, #train-status input").get_attribute("value") or ""
        found = re.search(r"smoke_run: running, step (\d+)", text)
        return int(found.group(1)) if found else 0

    wait(lambda: step() > 0, 180, "the fit to report a step > 0")
    find(driver, "#train-start").click()
    wait(lambda: "already running" in body_text(driver), 20, "the second start to be refused")
    open_tab(driver, "Train")
    driver.save_screenshot(os.fspath(tmp_path / "train.png"))
    find(driver, "#train-stop").click()
    status = wait(
        lambda: re.search(r"stopped at step (\d+)", find(driver, "#train-status textarea").get_attribute("value")),
        180,
        "the fit to stop",
    )
    run = root / "smoke_run"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = read_checkpoint(last)["global_step"]
    assert saved == int(status.group(1)) and saved > 0

    # the Runs tab lists the run, with its curves
    open_tab(driver, "Runs")
    find(driver, "#runs-refresh").click()
    time.sleep(1)
    choose(driver, "runs-run", "smoke_run")
    wait(lambda: "scalar tags" in find(driver, "#runs-summary").text, 60, "the run's summary")
    driver.save_screenshot(os.fspath(tmp_path / "runs.png"))
    for name in ("train", "runs"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0

    command = [
        sys.executable, "-m", "diffusion_lightning", "fit", "--config", os.fspath(REPO / "configs" / SMOKE_CONFIG),
        "--ckpt_path", os.fspath(last), "--trainer.max_steps", str(saved + 2), "--trainer.max_epochs", "1000",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", os.fspath(run),
        "--trainer.callbacks+=diffusion_lightning.app.progress.ProgressFile",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    progress = json.loads((run / "progress.json").read_text())
    assert progress["start_step"] == saved, progress
    assert progress["step"] == saved + 2 and progress["status"] == "finished", progress


def test_paths_outside_the_root_are_refused(tmp_path):
    from diffusion_lightning.app.paths import under_root
    from diffusion_lightning.app.runs import describe_run
    from diffusion_lightning.app.train import TrainingJob, parse_overrides

    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert under_root(root, "run") == (root / "run").resolve()
    assert under_root(root, root / "run" / "x.ckpt") == (root / "run" / "x.ckpt").resolve()
    for path in ("../elsewhere", os.fspath(outside), "link", "link/x.ckpt", "run/../../elsewhere", "/etc/passwd"):
        with pytest.raises(ValueError, match="outside the app's root"):
            under_root(root, path)
    with pytest.raises(SystemExit, match="outside the app's root"):
        describe_run(root, "link")
    job = TrainingJob(root)
    with pytest.raises(SystemExit, match="outside the app's root"):
        job.start(SMOKE_CONFIG, "", "../escape", REPO / "configs")
    with pytest.raises(SystemExit, match="outside the app's root"):
        job.start("../pyproject.toml", "", "run", REPO / "configs")
    with pytest.raises(SystemExit, match="default_root_dir is set by the app"):
        parse_overrides("--trainer.max_steps 3\n--trainer.default_root_dir /tmp")
    assert parse_overrides("--trainer.max_steps 3  # short\n\n--model.init_args.learning_rate=1e-3") == [
        "--trainer.max_steps", "3", "--model.init_args.learning_rate=1e-3",
    ]  # fmt: skip
    assert job.process is None


def test_generate_reports_the_errors_sample_gives(tmp_path):
    from diffusion_lightning.app.generate import PipelineCache, Request, generate, list_sources, parse_request

    with pytest.raises(SystemExit, match=r"--scheduler 'nope' is not accepted; expected one of: .*ddim"):
        parse_request(Request(source="p", scheduler="nope"), "class")
    with pytest.raises(SystemExit, match=r"--strength=1.5 must be in \(0, 1\]"):
        parse_request(Request(source="p", prompt="a", init_image=__file__, strength=1.5), "prompt")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SystemExit, match="outside the app's root"):
        generate(PipelineCache(root), Request(source=os.fspath(tmp_path)))
    assert list_sources(root) == []


def test_app_without_gradio_says_how_to_install_it(monkeypatch):
    from diffusion_lightning.app.command import MISSING_GRADIO, import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(SystemExit) as raised:
        import_gradio()
    assert (
        str(raised.value)
        == MISSING_GRADIO
        == ("error: diffusion-lightning app needs gradio: pip install 'diffusion_lightning[app]'")
    )


def test_a_checkpoint_is_a_source_too(root, digit_judge):
    from diffusion_lightning.app.generate import PipelineCache, Request, generate, list_sources

    assert [source for source in list_sources(root) if source.startswith("prototypes/")] == [CHECKPOINT, PIPELINE]
    cache = PipelineCache(root, device="cpu")
    for k in range(3):
        result = generate(cache, Request(source=CHECKPOINT, class_index=k, seed=1, batch_size=2, scheduler="ddim"))
        assert judge_reads(digit_judge, result.tensors) == [DIGITS[k]] * 2
        assert result.captions == [f"{CLASS_NAMES[k]} (seed 1)", f"{CLASS_NAMES[k]} (seed 2)"]
    with pytest.raises(SystemExit, match=r"class_labels contains \[3\]"):
        generate(cache, Request(source=CHECKPOINT, class_index=3))


def test_runs_show_config_curves_images_and_metrics(tmp_path):
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from diffusion_lightning.app.runs import describe_run, list_runs, plot_scalars

    root = tmp_path / "root"
    run = root / "exp" / "run_a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "samples").mkdir()
    import PIL.Image

    PIL.Image.new("RGB", (8, 8), "white").save(run / "samples" / "epoch=000-step=000004.png")
    (run / "metrics.json").write_text('{"status": "finished", "global_step": 4, "metrics": {"val/loss": 0.25}}')
    version = run / "lightning_logs" / "version_0"
    version.mkdir(parents=True)
    (version / "config.yaml").write_text("trainer:\n  max_steps: 4\n")
    writer = SummaryWriter(os.fspath(version))
    for step in range(4):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.add_scalar("eval/judge_accuracy", 0.5, 3)
    writer.add_image("attention/class_0", np.zeros((3, 4, 4), dtype=np.float32), 3)
    writer.close()
    assert list_runs(root) == ["exp/run_a"]
    found = describe_run(root, "exp/run_a")
    assert "max_steps: 4" in found["config"]
    assert found["scalars"]["train/loss"][-1] == (3, 0.25)
    assert [caption for _, caption in found["images"]] == [
        "samples/epoch=000-step=000004.png", "attention/class_0 @ step 3",
    ]  # fmt: skip
    assert ["metrics.json", "metrics.val/loss", 0.25] in found["metrics"]
    assert found["checkpoints"] == ["checkpoints/last.ckpt"]
    assert plot_scalars(found["scalars"]).axes[1].get_legend_handles_labels()[1] == ["eval/judge_accuracy"]


def test_app_command_checks_its_options(tmp_path):
    from diffusion_lightning.cli import main

    with pytest.raises(SystemExit, match="--root '.*missing' is not a folder"):
        main(["app", "--root", os.fspath(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--port=70000 must be in 0..65535"):
        main(["app", "--root", os.fspath(tmp_path), "--port", "70000"])
    with pytest.raises(SystemExit, match="unrecognized|--share"):
        main(["app", "--share"])


def test_app_command_is_registered_and_serves_the_page(tmp_path):
    from diffusion_lightning.app import main
    from diffusion_lightning.cli import _extra_commands

    assert _extra_commands()["app"][1] is main
    pytest.importorskip("gradio")
    command = [sys.executable, "-m", "diffusion_lightning", "app", "--root", os.fspath(tmp_path), "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as server:
        try:
            lines: list[str] = []
            for line in server.stdout:
                lines.append(line)
                found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
                if found:
                    break
            assert found, "".join(lines)
            with urllib.request.urlopen(found.group(1), timeout=30) as response:
                assert response.status == 200 and "diffusion-lightning" in response.read().decode()
        finally:
            server.terminate()
            server.wait(30)


def test_text_to_image_and_image_to_image_match_sample(tmp_path):
    import numpy as np
    import PIL.Image

    from diffusion_lightning import LatentDiffusionModule
    from diffusion_lightning.app.generate import PipelineCache, Request, generate
    from diffusion_lightning.commands import sample

    root = tmp_path / "root"
    torch.manual_seed(0)
    LatentDiffusionModule(num_inference_steps=2).export_pipeline(root / "sd")
    PIL.Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3))).save(root / "init.png")
    cache = PipelineCache(root, device="cpu")
    for extra, values in (([], {}), (["--image", os.fspath(root / "init.png"), "--strength", "0.5"],
                                     {"init_image": os.fspath(root / "init.png"), "strength": 0.5})):  # fmt: skip
        result = generate(cache, Request(source="sd", prompt="the digit one", steps=2, seed=3, batch_size=2, **values))
        assert len(result.images) == 2 and result.captions[1] == "the digit one (seed 4)"
        out = tmp_path / f"sample{len(extra)}"
        sample.main(["--pipeline", os.fspath(root / "sd"), "--out", os.fspath(out), "--steps", "2", "--seed", "3",
                     "--n-per-prompt", "2", "--prompt", "the digit one", *extra])  # fmt: skip
        for j in range(2):
            expected = np.asarray(PIL.Image.open(out / "prompt=0" / f"sample={j:03d}.png"), dtype=np.int16)
            assert np.abs(np.asarray(result.images[j], dtype=np.int16) - expected).max() == 0
    with pytest.raises(SystemExit, match=r"--strength=0.01 with 2 steps leaves no denoising step"):
        generate(
            cache, Request(source="sd", prompt="x", steps=2, init_image=os.fspath(root / "init.png"), strength=0.01)
        )

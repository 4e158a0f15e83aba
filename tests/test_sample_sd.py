"""``diffusion-lightning sample`` on text-to-image pipelines: prompts, seeds, negative prompts, image-to-image."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.commands import sample
from diffusion_lightning.modules.loading import is_hub_id, load_pipeline_source
from tests.conftest import REPO

PROMPTS = ["a handwritten digit zero", "the digit one"]


def sd_module() -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(num_inference_steps=2)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline folder (16x16 images)."""
    return sd_module().export_pipeline(tmp_path_factory.mktemp("pipelines") / "sd")


def run(folder: Path, out: Path, *extra: str) -> dict:
    """Sample with 2 steps into ``out``; the samples.json written."""
    sample.main(["--pipeline", str(folder), "--out", str(out), "--steps", "2", *extra])
    return json.loads((out / "samples.json").read_text())


def pixels(out: Path, prompt: int, index: int) -> np.ndarray:
    return np.asarray(PIL.Image.open(out / f"prompt={prompt}" / f"sample={index:03d}.png"), dtype=np.int16)


def loaded_pipelines(monkeypatch) -> list:
    """Every pipeline ``sample`` loads from now on, as it configures and runs it (the same components)."""
    seen = []
    load = sample.load_pipeline

    def spy(args):
        pipeline, defaults = load(args)
        seen.append(pipeline)
        return pipeline, defaults

    monkeypatch.setattr(sample, "load_pipeline", spy)
    return seen


def test_text_to_image_writes_grid_images_and_json(sd_folder, tmp_path):
    memory = ("--attention-slicing", "--vae-slicing", "--vae-tiling")
    meta = run(sd_folder, tmp_path, "--prompt", *PROMPTS, "--n-per-prompt", "3", "--scale", "1", *memory)
    for i in range(2):
        files = sorted(p.name for p in (tmp_path / f"prompt={i}").iterdir())
        assert files == ["sample=000.png", "sample=001.png", "sample=002.png"]
        assert PIL.Image.open(tmp_path / f"prompt={i}" / "sample=000.png").size == (16, 16)
    grid = PIL.Image.open(tmp_path / "samples.png")
    assert grid.height == 2 + 2 * (16 + 2)  # two rows of 16 px tiles, padding 2, scale 1
    assert grid.width > 2 + 3 * (16 + 2)  # three tiles per row plus the prompt labels
    assert meta["prompts"] == PROMPTS and meta["negative_prompts"] is None
    # the module's guidance (2.0), recorded by export, not the text-to-image fallback 7.5
    assert meta["n_per_prompt"] == 3 and meta["num_inference_steps"] == 2 and meta["guidance_scale"] == 2.0
    assert (meta["height"], meta["width"]) == (16, 16) and meta["image"] is None and meta["strength"] is None
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["device"] and meta["seed"] == 0
    assert meta["options"] == dict(attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=False,
                                   compile=False)  # fmt: skip


def test_memory_options_are_applied_to_the_pipeline_and_keep_the_images(sd_folder, tmp_path, monkeypatch):
    seen = loaded_pipelines(monkeypatch)
    common = ("--prompt", *PROMPTS, "--n-per-prompt", "2")
    run(sd_folder, tmp_path / "plain", *common)
    run(sd_folder, tmp_path / "sliced", *common, "--attention-slicing", "--vae-slicing", "--vae-tiling")
    plain, sliced = seen
    assert not plain.vae.use_slicing and not plain.vae.use_tiling
    assert sliced.vae.use_slicing and sliced.vae.use_tiling
    processors = {name: type(p).__name__ for name, p in sliced.unet.attn_processors.items()}
    assert processors and set(processors.values()) == {"SlicedAttnProcessor"}, processors
    assert "SlicedAttnProcessor" not in {type(p).__name__ for p in plain.unet.attn_processors.values()}
    for i in range(2):
        for j in range(2):  # slicing saves memory; it must not change what is drawn
            difference = pixels(tmp_path / "plain", i, j) - pixels(tmp_path / "sliced", i, j)
            assert np.abs(difference).max() <= 1, (i, j)


def test_seeds_reproduce_independently_of_batching(sd_folder, tmp_path):
    common = ("--prompt", *PROMPTS, "--n-per-prompt", "2")
    run(sd_folder, tmp_path / "all", *common)
    meta = run(sd_folder, tmp_path / "one", *common, "--batch-size", "1", "--no-images", "--scheduler", "ddim")
    assert meta["scheduler"] == "ddim" and not (tmp_path / "one" / "prompt=0").exists()
    run(sd_folder, tmp_path / "ones", *common, "--batch-size", "1")
    run(sd_folder, tmp_path / "other", *common, "--seed", "1")
    for i in range(2):
        for j in range(2):
            same = pixels(tmp_path / "all", i, j), pixels(tmp_path / "ones", i, j)
            assert np.abs(same[0] - same[1]).max() <= 1, (i, j)  # equal up to rounding of batched math
            assert np.abs(same[0] - pixels(tmp_path / "other", i, j)).mean() > 1, (i, j)
    assert np.abs(pixels(tmp_path / "all", 0, 0) - pixels(tmp_path / "all", 0, 1)).mean() > 1  # own seed each


def test_negative_prompt_changes_the_images_and_must_match_the_prompts(sd_folder, tmp_path):
    common = ("--prompt", PROMPTS[0], "--n-per-prompt", "1", "--guidance-scale", "5")
    run(sd_folder, tmp_path / "plain", *common)
    meta = run(sd_folder, tmp_path / "negative", *common, "--negative-prompt", "blurry digit")
    assert meta["negative_prompts"] == ["blurry digit"]
    assert np.abs(pixels(tmp_path / "plain", 0, 0) - pixels(tmp_path / "negative", 0, 0)).mean() > 1
    with pytest.raises(SystemExit, match=r"--negative-prompt has 3 entries for 2 --prompt"):
        run(sd_folder, tmp_path / "x", "--prompt", *PROMPTS, "--negative-prompt", "a", "b", "c")


@pytest.fixture(scope="module")
def faithful_folder(sd_folder, tmp_path_factory) -> Path:
    """The tiny pipeline with a VAE whose encoding is deterministic and whose latents have about unit scale.

    The random VAE's posterior has a standard deviation near 1 and its latents are ~0.3 in size, so the
    0.18215 scaling drowns them in even the smallest img2img noise; with these two changes a weak
    ``--strength`` visibly keeps the input (as the VAE reproduces it).
    """
    pipeline = DiffusionPipeline.from_pretrained(sd_folder)
    channels = pipeline.vae.config.latent_channels
    with torch.no_grad():  # quant_conv gives [mean, logvar]: a log-variance of -30 is a std of 3e-7
        pipeline.vae.quant_conv.weight[channels:] = 0
        pipeline.vae.quant_conv.bias[channels:] = -30
    pipeline.vae.register_to_config(scaling_factor=4.0)
    folder = tmp_path_factory.mktemp("pipelines") / "faithful"
    pipeline.save_pretrained(folder)
    return folder


def vae_round_trip(folder: Path, image: Path) -> np.ndarray:
    """``image`` encoded and decoded by the VAE of ``folder``, as 0..255 pixels."""
    pipeline = DiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        latents = pipeline.vae.encode(pipeline.image_processor.preprocess(PIL.Image.open(image).convert("RGB")))
        decoded = pipeline.vae.decode(latents.latent_dist.mode()).sample
    return ((decoded[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).numpy()


def test_image_to_image_follows_the_image_and_the_strength(faithful_folder, tmp_path):
    rows, columns = np.mgrid[0:16, 0:16]
    smooth, noise = tmp_path / "smooth.png", tmp_path / "noise.png"
    PIL.Image.fromarray(np.stack([columns * 16, rows * 16, (rows + columns) * 8], -1).astype(np.uint8)).save(smooth)
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(noise)

    def draw(image: Path, strength: str, steps: str) -> np.ndarray:
        out = tmp_path / f"{image.stem}-{strength}"
        sample.main(["--pipeline", str(faithful_folder), "--out", str(out), "--steps", steps, "--prompt", PROMPTS[0],
                     "--n-per-prompt", "1", "--image", str(image), "--strength", strength])  # fmt: skip
        meta = json.loads((out / "samples.json").read_text())
        assert meta["image"] == str(image) and meta["strength"] == float(strength)
        assert meta["pipeline"] == "StableDiffusionImg2ImgPipeline"
        drawn = pixels(out, 0, 0)
        assert drawn.shape == (16, 16, 3)
        return drawn.astype(np.float64)

    weak = draw(smooth, "0.01", "100")  # one denoising step, from the least noised timestep
    strong = draw(smooth, "1", "2")
    half = draw(smooth, "0.5", "2")
    other = draw(noise, "0.01", "100")
    kept = vae_round_trip(faithful_folder, smooth)
    assert np.abs(weak - kept).mean() < 10  # a weak strength keeps the input...
    assert np.abs(strong - kept).mean() > 2 * np.abs(weak - kept).mean()  # ...a full one redraws it
    assert np.abs(half - strong).mean() > 2  # --strength reaches the pipeline
    assert np.abs(weak - other).mean() > 10  # and so does --image


def test_image_to_image_checks_its_arguments(sd_folder, tmp_path):
    image = tmp_path / "start.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    common = ("--prompt", PROMPTS[0], "--n-per-prompt", "2", "--image", str(image))
    for strength in ("1e-9", "1.5", "0"):
        with pytest.raises(SystemExit, match="--strength="):
            run(sd_folder, tmp_path / "bad", *common, "--strength", strength)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(SystemExit, match="missing.png"):
        run(sd_folder, tmp_path / "bad", "--prompt", "x", "--image", missing)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a png")
    with pytest.raises(SystemExit, match="notes.png.*could not be read"):
        run(sd_folder, tmp_path / "bad", "--prompt", "x", "--image", str(not_an_image))


def test_prompts_belong_to_text_pipelines(sd_folder, tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "classes")
    with pytest.raises(SystemExit, match=r"--prompt.*ClassConditionedPipeline"):
        run(tmp_path / "classes", tmp_path / "out", "--prompt", "a digit")
    with pytest.raises(SystemExit, match=r"--image.*ClassConditionedPipeline"):
        run(tmp_path / "classes", tmp_path / "out", "--image", str(tmp_path / "classes" / "model_index.json"))
    with pytest.raises(SystemExit, match="give --prompt"):
        run(sd_folder, tmp_path / "out")
    meta = run(tmp_path / "classes", tmp_path / "classes_out", "--n-per-class", "1")  # loaded via DiffusionPipeline
    assert meta["classes"] == [0, 1, 2] and (tmp_path / "classes_out" / "class=2" / "sample=000.png").is_file()


def test_cpu_offload_without_cuda_is_a_clear_error(sd_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--cpu-offload.*needs a CUDA GPU"):
        run(sd_folder, tmp_path, "--prompt", "x", "--cpu-offload")


class Captioned(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"images": torch.rand(3, 16, 16, generator=g) * 2 - 1, "captions": PROMPTS[i]}


def collate(items: list[dict]) -> dict:
    return {"images": torch.stack([x["images"] for x in items]), "captions": [x["captions"] for x in items]}


def test_sample_from_a_latent_checkpoint(tmp_path):
    module = sd_module()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Captioned(), batch_size=2, collate_fn=collate))
    trainer.save_checkpoint(tmp_path / "sd.ckpt")
    out = tmp_path / "out"
    sample.main(["--ckpt", str(tmp_path / "sd.ckpt"), "--out", str(out), "--prompt", "x", "--n-per-prompt", "1"])
    meta = json.loads((out / "samples.json").read_text())
    assert meta["num_inference_steps"] == 2 and meta["guidance_scale"] == module.guidance_scale
    assert (meta["height"], meta["width"]) == (16, 16) and meta["weights"] == "ema"
    assert PIL.Image.open(out / "prompt=0" / "sample=000.png").size == (16, 16)


# ---------------------------------------------------------------------- where --pipeline points

PIPELINE_SOURCES_SCRIPT = """
import json, sys, time
from diffusion_lightning.commands import sample
results = []
for source in sys.argv[1:]:
    start = time.perf_counter()
    try:
        sample.main(["--pipeline", source, "--out", "unused"])
        message = None
    except SystemExit as error:
        message = str(error)
    results.append([source, time.perf_counter() - start, message])
print("RESULTS", json.dumps(results))
"""


def test_missing_pipeline_sources_fail_at_once_with_the_hub_online_but_unreachable(tmp_path):
    """With ``HF_HUB_OFFLINE`` unset, a source that is nowhere fails in well under a second, naming what to give.

    huggingface_hub reads its settings once, at import: the commands run in a fresh interpreter whose
    hub endpoint is a closed local port (no request leaves this machine).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=closed, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    sources = ["not_a_dir/x", "not_a_dir", "./not_a_dir/x", "runs/a/b"]
    proc = subprocess.run(
        [sys.executable, "-c", PIPELINE_SOURCES_SCRIPT, *sources],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    line = next((row for row in proc.stdout.splitlines() if row.startswith("RESULTS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {source: (seconds, message) for source, seconds, message in json.loads(line[len("RESULTS ") :])}
    for source, (seconds, message) in results.items():
        assert seconds < 5, (source, seconds, message)  # not a benchmark: a retried download takes 20 s and more
        assert message and message.startswith(f"error: pipeline={source!r}"), (source, message)
    seconds, message = results["not_a_dir/x"]  # owner/name: a hub id, looked up once
    assert f"is not a local folder, and as a hub id (owner/name) it is neither in the local cache nor reachable at " \
           f"{closed}" in message  # fmt: skip
    for source in sources[1:]:  # read as paths: checked here only
        assert "does not exist; give an exported pipeline folder (with model_index.json)" in results[source][1]


def test_what_reads_as_a_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert is_hub_id("owner/name") and is_hub_id("CompVis/ldm-celebahq-256")
    for source in ["name", "./owner/name", "../owner/name", "/owner/name", "~/name", "a/b/c", "owner\\name",
                   "runs/typo", "bad--name/x", "owner/name.", "notes.txt", "runs"]:  # fmt: skip
        assert not is_hub_id(source), source
    monkeypatch.setattr(DiffusionPipeline, "load_config", lambda *a, **k: pytest.fail("a path reached diffusers"))
    with pytest.raises(ValueError, match=r"pipeline='runs/typo' does not exist; give an exported pipeline folder"):
        load_pipeline_source(pipeline="runs/typo")
    with pytest.raises(ValueError, match=r"pipeline='notes.txt' is a file; .*a .ckpt checkpoint is read with --ckpt"):
        load_pipeline_source(pipeline="notes.txt")


def test_a_home_relative_pipeline_folder_loads(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_pipeline.save_pretrained(tmp_path / "classes")
    pipeline, _ = load_pipeline_source(pipeline="~/classes")
    assert isinstance(pipeline, type(tiny_pipeline))


class _NoSuchRepository(http.server.BaseHTTPRequestHandler):
    """A hub that knows no repository: what huggingface.co answers for a missing one."""

    def do_GET(self):  # noqa: N802 - the http.server hook
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()
        type(self).paths.append(self.path)

    def log_message(self, *args):
        pass


def test_a_hub_id_the_hub_does_not_know_fails_after_one_request(monkeypatch):
    import huggingface_hub

    _NoSuchRepository.paths = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _NoSuchRepository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(DiffusionPipeline, "load_config", lambda *a, **k: pytest.fail("a missing repository was read"))
    try:
        with pytest.raises(ValueError, match=rf"pipeline='someone/no-such-pipeline' is not a local folder, and the hub "
                                             rf"\({endpoint}\) has no repository of that name"):  # fmt: skip
            load_pipeline_source(pipeline="someone/no-such-pipeline")
    finally:
        server.shutdown()
        server.server_close()
    asked = [path for path in _NoSuchRepository.paths if path.startswith("/api/models/")]
    assert asked == ["/api/models/someone/no-such-pipeline"]  # one lookup, no retries

"""FluxModule: Flux's conditioning and packed latents as diffusers has them, flow matching, exports diffusers loads.

The export checks load the folders in a fresh Python process that imports diffusers alone, as a user
of the exported model would, and compare its images with the module's own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import load_file

from diffusion_lightning import FluxComponents, FluxModule, load_module
from diffusion_lightning.cli import main
from diffusion_lightning.commands import export, sample
from diffusion_lightning.nets.flux import build_flux_components
from tests.conftest import REPO, quiet_trainer
from tests.fresh_pipelines import run_fresh
from tests.test_latent import loader

CONFIG = REPO / "configs" / "smoke" / "flux_tiny.yaml"
PROMPT = "a handwritten digit seven"

#: What diffusers logs when a Flux LoRA file adapts the transformer alone (as its own Flux training
#: scripts write them by default): informational, the file is complete.
NO_TEXT_ENCODER_LORA = "No LoRA keys associated to CLIPTextModel"


def fresh_process(tmp_path: Path, jobs: dict[str, dict]) -> dict:
    """``jobs`` loaded by ``FluxPipeline`` in a diffusers-only process (``run_fresh``)."""
    return run_fresh(tmp_path, "FluxPipeline", jobs, guidance_scale=3.5)


def images(pipeline: FluxPipeline, prompt: str = PROMPT) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(prompt, num_inference_steps=2, guidance_scale=3.5, height=16, width=16,
                   generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    return out.images


def flux_module(**kwargs) -> FluxModule:
    kwargs = {"learning_rate": 1e-2, "num_inference_steps": 2, "image_size": 16, **kwargs}
    return FluxModule(**kwargs)


def fit(module: FluxModule, tmp_path: Path, steps: int = 2) -> FluxModule:
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, loader())
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """One run of ``configs/smoke/flux_tiny.yaml`` (LoRA on the transformer, gradient checkpointing)."""
    root = tmp_path_factory.mktemp("flux_tiny")
    main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return root


# ---------------------------------------------------------------------- conditioning and the denoiser call


def test_prompt_embeddings_are_the_flux_pipelines():
    module = flux_module()
    pipeline = module.build_pipeline()
    hidden, pooled = module.encode_prompt(module.tokenize([PROMPT, "two"]))
    prompt_embeds, pooled_embeds, text_ids = pipeline.encode_prompt([PROMPT, "two"], prompt_2=None, device="cpu")
    torch.testing.assert_close(hidden, prompt_embeds)  # T5's hidden states, padded to 512 tokens as the pipeline does
    torch.testing.assert_close(pooled, pooled_embeds)  # CLIP's pooled output
    assert hidden.shape[1] == text_ids.shape[0] == 512


def test_training_step_packs_latents_and_embeds_the_training_guidance():
    module = flux_module(training_guidance_scale=2.5)
    seen = []
    module.transformer.register_forward_pre_hook(lambda net, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a digit", "two"]}
    generator = torch.Generator().manual_seed(0)
    latents, condition = module.unpack_batch(batch, generator)
    out = module.diffusion_step(latents, condition, generator)
    call = seen[0]
    # 8x8 latents of 4 channels: 16 tokens of 2x2x4 features, with the pipeline's position ids
    assert call["hidden_states"].shape == (2, 16, 16)
    torch.testing.assert_close(call["hidden_states"], FluxPipeline._pack_latents(out.noisy, 2, 4, 8, 8))
    torch.testing.assert_close(call["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))
    assert call["guidance"].tolist() == [2.5, 2.5]
    torch.testing.assert_close(call["timestep"], out.timesteps / 1000)  # sigma, as the pipeline passes it
    assert out.prediction.shape == latents.shape == (2, 4, 8, 8)
    # the velocity target of flow matching
    sigmas = (out.timesteps / 1000).view(-1, 1, 1, 1)
    noise = (out.noisy - (1 - sigmas) * latents) / sigmas
    torch.testing.assert_close(out.target, noise - latents, atol=1e-4, rtol=1e-4)


def test_latents_are_shifted_and_scaled_by_the_vae_config():
    module = flux_module()
    assert (module.vae.config.shift_factor, module.vae.config.scaling_factor) == (0.1, 0.5)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    ours = module.encode_images(images, torch.Generator().manual_seed(3))
    theirs = module.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, (theirs - 0.1) * 0.5)


# ---------------------------------------------------------------------- bad input


def test_flow_matching_is_forced_and_other_choices_are_refused():
    module = flux_module()
    assert module.is_flow and isinstance(module.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert module.sampler == "euler" and module.guidance_scale == 3.5 and module.prompt_dropout == 0.0
    with pytest.raises(ValueError, match=r"prediction_type='epsilon' is not accepted by FluxModule; it is trained "
                                         r"by flow matching: use 'flow_prediction'"):  # fmt: skip
        flux_module(prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"training_mode='text_encoder' is not accepted.*use 'full' or 'lora'"):
        flux_module(training_mode="text_encoder")
    with pytest.raises(ValueError, match=r"lora_text_encoder=True is not accepted.*stay frozen"):
        flux_module(training_mode="lora", lora_text_encoder=True)
    with pytest.raises(
        ValueError, match=r"sampler='dpm' is not accepted.*FluxPipeline samples with one of \['euler'\]"
    ):
        flux_module(sampler="dpm")
    with pytest.raises(ValueError, match=r"image_size=18 is not accepted.*use a multiple of 4"):
        flux_module(image_size=18)


def test_a_transformer_that_does_not_fit_the_encoders_is_refused_naming_the_field():
    tiny = FluxComponents().transformer
    with pytest.raises(ValueError, match=r"components.transformer has joint_attention_dim=16 but the T5 encoder's "
                                         r"hidden states \(components.text_encoder_2.d_model\) are 32 wide; set "
                                         r"joint_attention_dim: 32"):  # fmt: skip
        flux_module(components={"transformer": {**tiny, "joint_attention_dim": 16}})
    with pytest.raises(ValueError, match=r"components.transformer has pooled_projection_dim=64 but the CLIP encoder's "
                                         r"pooled output \(components.text_encoder.hidden_size\) is 32 wide; set "
                                         r"pooled_projection_dim: 32"):  # fmt: skip
        flux_module(components={"transformer": {**tiny, "pooled_projection_dim": 64}})
    with pytest.raises(ValueError, match=r"in_channels=4, .*latent_channels=4, packed in 2x2 patches: set "
                                         r"in_channels: 16"):  # fmt: skip
        flux_module(components={"transformer": {**tiny, "in_channels": 4}})


def test_pretrained_flux_folder_loads_trains_unshifted_and_its_gaps_are_named(tmp_path):
    parts = build_flux_components({"seed": 3})
    FluxPipeline(**parts).save_pretrained(tmp_path / "flux")
    module = FluxModule(pretrained=str(tmp_path / "flux"), training_mode="lora", image_size=16)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        expected = next(iter(parts[name].state_dict().values()))
        torch.testing.assert_close(next(iter(getattr(module, name).state_dict().values())), expected)
    # FLUX.1's scheduler shifts by resolution at sampling only: training is unshifted, sampling keeps its config
    assert module.flow_shift == 1.0
    assert module.sampling_scheduler().config.use_dynamic_shifting
    shutil.rmtree(tmp_path / "flux" / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['text_encoder_2'\]; a FluxPipeline"):
        FluxModule(pretrained=str(tmp_path / "flux"))


# ---------------------------------------------------------------------- training


def test_gradient_checkpointing_trains_the_transformers_adapters(tmp_path):
    module = flux_module(training_mode="lora", lora_rank=2, gradient_checkpointing=True)
    assert module.transformer.is_gradient_checkpointing
    adapters = {k: v.detach().clone() for k, v in module.named_parameters() if "lora_B" in k}
    assert adapters and all(k.startswith("transformer.") for k in adapters)
    fit(module, tmp_path, steps=1)
    assert all(not torch.equal(v, adapters[k]) for k, v in module.named_parameters() if "lora_B" in k)
    assert module.trainable_keys() == {k for k, v in module.named_parameters() if "lora_" in k}


# ---------------------------------------------------------------------- the smoke config and exports


def test_smoke_config_checkpoints_hold_the_transformer_adapters(smoke_run):
    state = torch.load(smoke_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["_class_path"].endswith("FluxModule")
    keys = state["state_dict"]
    assert keys and all("lora_" in key for key in keys)
    assert {key.split(".")[0] for key in keys} == {"transformer"}
    assert list(smoke_run.glob("samples/epoch=*-step=*.png"))  # validation images, through FluxPipeline
    assert type(load_module(smoke_run / "checkpoints" / "last.ckpt").build_pipeline()) is FluxPipeline


def test_lora_and_merged_exports_load_in_a_fresh_process_and_match_the_module(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints" / "last.ckpt"
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "lora")])
    assert "pytorch_lora_weights.safetensors" in [p.name for p in (tmp_path / "lora").iterdir()]
    prefixes = {key.split(".")[0] for key in load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")}
    assert prefixes == {"transformer"}
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged"), "--merge-lora"])

    module = load_module(ckpt)
    base = module.make_pipeline({**module.base_components(), "scheduler": module.sampling_scheduler()})
    base.save_pretrained(tmp_path / "base")  # the base model a user would load the adapters into
    result = fresh_process(
        tmp_path,
        {
            "base": {"folder": str(tmp_path / "base"), "prompt": PROMPT},
            "adapted": {"folder": str(tmp_path / "base"), "lora": str(tmp_path / "lora"), "prompt": PROMPT},
            "merged": {"folder": str(tmp_path / "merged"), "prompt": PROMPT},
        },
    )
    adapted_warnings = [w for w in result["warnings"]["adapted"] if NO_TEXT_ENCODER_LORA not in w]
    assert (result["warnings"]["base"], adapted_warnings, result["warnings"]["merged"]) == ([], [], [])
    assert not result["errors"], result["errors"]
    ours = images(module.build_pipeline())
    plain, adapted, merged = (result["images"][name] for name in ("base", "adapted", "merged"))
    assert (adapted - plain).abs().max() > 1e-3  # the adapters change the output...
    torch.testing.assert_close(adapted, ours, atol=1e-5, rtol=1e-4)  # ...into the module's
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-3)

    # the sample command on the merged folder draws at the size the run trained at, recorded by export
    # (without sampling_defaults.json it would be FluxPipeline's default, 128 latent pixels = 256 here)
    assert json.loads((tmp_path / "merged" / "sampling_defaults.json").read_text())["image_size"] == 16
    out = tmp_path / "samples"
    sample.main(["--pipeline", str(tmp_path / "merged"), "--prompt", "a digit", "--steps", "2", "--out", str(out)])
    record = json.loads((out / "samples.json").read_text())
    assert record["pipeline"] == "FluxPipeline" and record["height"] == record["width"] == 16


def test_full_export_loads_in_a_fresh_process_without_warnings_and_matches_the_module(tmp_path):
    before = build_flux_components()["transformer"]
    module = fit(flux_module(), tmp_path / "run")
    assert not torch.equal(module.transformer.x_embedder.weight, before.x_embedder.weight)
    module.export_pipeline(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is True  # what FluxPipeline's resolution shift needs
    result = fresh_process(tmp_path, {"full": {"folder": str(tmp_path / "pipe"), "prompt": PROMPT}})
    assert result["warnings"] == {"full": []}
    assert not result["errors"], result["errors"]
    torch.testing.assert_close(result["images"]["full"], images(module.build_pipeline()), atol=1e-5, rtol=1e-4)

"""StableDiffusion3Module: SD3's conditioning as diffusers has it, on FluxModule's training; exports diffusers loads.

The export checks load the folders in a fresh Python process that imports diffusers alone (the Flux
tests' script, with ``StableDiffusion3Pipeline``) and compare its images with the module's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from diffusion_lightning import SD3Components, StableDiffusion3Module
from diffusion_lightning.nets.sd3 import build_sd3_components
from tests.fresh_pipelines import run_fresh
from tests.test_flux import NO_TEXT_ENCODER_LORA, PROMPT, fit


def fresh_process(tmp_path: Path, jobs: dict[str, dict]) -> dict:
    """``jobs`` loaded by ``StableDiffusion3Pipeline`` in a diffusers-only process (``run_fresh``)."""
    return run_fresh(tmp_path, "StableDiffusion3Pipeline", jobs, guidance_scale=3.5)


def images(pipeline: StableDiffusion3Pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(PROMPT, num_inference_steps=2, guidance_scale=3.5, height=16, width=16,
                   generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    return out.images


def sd3_module(**kwargs) -> StableDiffusion3Module:
    return StableDiffusion3Module(**{"learning_rate": 1e-2, "num_inference_steps": 2, "image_size": 16, **kwargs})


def test_prompt_embeddings_are_the_sd3_pipelines_and_the_transformer_gets_sigma_times_1000():
    module = sd3_module()
    pipeline = module.build_pipeline()
    hidden, pooled = module.encode_prompt(module.tokenize([PROMPT, "two"]))
    theirs = pipeline.encode_prompt([PROMPT, "two"], None, None, device="cpu")
    prompt_embeds, negative_embeds, pooled_embeds, negative_pooled = theirs
    torch.testing.assert_close(hidden, prompt_embeds)  # CLIP states padded to the T5 width, then T5's 256 tokens
    torch.testing.assert_close(pooled, pooled_embeds)
    # the unconditional branch the pipeline samples with is what prompt dropout trains: the empty prompt's
    empty_hidden, empty_pooled = module.encode_prompt(module.empty_prompt_ids[None].expand(2, -1))
    torch.testing.assert_close(empty_hidden, negative_embeds)
    torch.testing.assert_close(empty_pooled, negative_pooled)

    seen = []
    module.transformer.register_forward_pre_hook(lambda net, args, kwargs: seen.append(kwargs), with_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a digit", "two"]}
    out = module.diffusion_step(*module.unpack_batch(batch, generator), generator)
    assert seen[0]["hidden_states"].shape == (2, 4, 8, 8)  # unpacked latents: the transformer patchifies them
    torch.testing.assert_close(seen[0]["timestep"], out.timesteps)


def test_bad_input_is_refused_naming_the_field(tmp_path):
    tiny = SD3Components().transformer
    with pytest.raises(ValueError, match=r"prediction_type='v_prediction' is not accepted by StableDiffusion3Module"):
        sd3_module(prediction_type="v_prediction")
    joint = r"transformer has joint_attention_dim=32 but .* \(components.text_encoder_3.d_model\) are 64 wide"
    with pytest.raises(ValueError, match=joint):
        sd3_module(components={"transformer": {**tiny, "joint_attention_dim": 32}})
    with pytest.raises(ValueError, match=r"pooled_projection_dim=16 but the pooled embeddings .* are 32 wide"):
        sd3_module(components={"transformer": {**tiny, "pooled_projection_dim": 16}})
    # a pretrained folder: its scheduler's shift (SD3's 3.0) is also the training shift
    StableDiffusion3Pipeline(**build_sd3_components()).save_pretrained(tmp_path / "sd3")
    assert StableDiffusion3Module(pretrained=str(tmp_path / "sd3"), image_size=16).flow_shift == 3.0


def test_lora_merged_and_full_exports_load_in_a_fresh_process_and_match_the_module(tmp_path):
    module = fit(sd3_module(training_mode="lora", lora_rank=2, lora_alpha=8, gradient_checkpointing=True), tmp_path)
    assert module.transformer.is_gradient_checkpointing
    module.export_pipeline(tmp_path / "lora")
    assert {key.split(".")[0] for key in load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")} == {
        "transformer"
    }
    module.export_pipeline(tmp_path / "merged", merge_lora=True)
    base = module.make_pipeline({**module.base_components(), "scheduler": module.sampling_scheduler()})
    base.save_pretrained(tmp_path / "base")
    full = fit(sd3_module(), tmp_path / "full")
    full.export_pipeline(tmp_path / "full_pipe")
    result = fresh_process(
        tmp_path,
        {
            "base": {"folder": str(tmp_path / "base"), "prompt": PROMPT},
            "adapted": {"folder": str(tmp_path / "base"), "lora": str(tmp_path / "lora"), "prompt": PROMPT},
            "merged": {"folder": str(tmp_path / "merged"), "prompt": PROMPT},
            "full": {"folder": str(tmp_path / "full_pipe"), "prompt": PROMPT},
        },
    )
    found = result["warnings"].items()
    warnings = {name: [w for w in logged if NO_TEXT_ENCODER_LORA not in w] for name, logged in found}
    assert warnings == {"base": [], "adapted": [], "merged": [], "full": []}
    assert not result["errors"], result["errors"]
    ours = images(module.build_pipeline())
    assert (result["images"]["adapted"] - result["images"]["base"]).abs().max() > 1e-3
    torch.testing.assert_close(result["images"]["adapted"], ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result["images"]["merged"], ours, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(result["images"]["full"], images(full.build_pipeline()), atol=1e-5, rtol=1e-4)


def test_smoke_config_fits_with_cached_text_embeddings_and_exports_from_the_command_line(tmp_path):
    from diffusion_lightning.cli import main
    from diffusion_lightning.commands import export
    from tests.conftest import REPO

    root, cache = tmp_path / "run", tmp_path / "text"
    main(["fit", "--config", str(REPO / "configs" / "smoke" / "sd3_tiny.yaml"), "--trainer.default_root_dir",
          str(root), "--trainer.enable_progress_bar", "false", "--model.init_args.text_embedding_cache_dir",
          str(cache)])  # fmt: skip
    assert len(list(cache.rglob("*.pt"))) == 11  # the ten digits' captions and the empty prompt
    export.main(["--ckpt", str(root / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "lora")])
    adapters = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and {key.split(".")[0] for key in adapters} == {"transformer"}

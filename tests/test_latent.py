"""LatentDiffusionModule: training modes, small checkpoints that resume, exports diffusers loads."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from diffusion_lightning import LatentDiffusionModule
from diffusion_lightning.commands import export
from diffusion_lightning.nets.latent import build_components, write_byte_level_tokenizer
from tests.conftest import quiet_trainer

CAPTIONS = ["a handwritten digit zero", "a handwritten digit one", "a digit two", "the digit three"]


class Captioned(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"images": torch.rand(3, 16, 16, generator=g) * 2 - 1, "captions": CAPTIONS[i % 4], "keys": f"img{i}"}


def collate(items: list[dict]) -> dict:
    return {
        "images": torch.stack([x["images"] for x in items]),
        "captions": [x["captions"] for x in items],
        "keys": [x["keys"] for x in items],
    }


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Captioned(), batch_size=4, collate_fn=collate)


def fit(tmp_path, steps: int = 2, **kwargs) -> tuple[LatentDiffusionModule, object]:
    kwargs.setdefault("learning_rate", 1e-3)
    kwargs.setdefault("num_inference_steps", 2)
    module = LatentDiffusionModule(**kwargs)
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, loader())
    return module, trainer


def images(pipeline: StableDiffusionPipeline, seed: int = 0) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(["a handwritten digit"], num_inference_steps=2, height=16, width=16, output_type="pt",
                   generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return out.images


def test_training_modes_train_only_what_they_say(tmp_path):
    before = build_components()
    full, _ = fit(tmp_path / "full")
    assert not torch.equal(full.unet.conv_in.weight, before["unet"].conv_in.weight)
    torch.testing.assert_close(full.vae.encoder.conv_in.weight, before["vae"].encoder.conv_in.weight)
    text = before["text_encoder"].embeddings.token_embedding.weight
    torch.testing.assert_close(full.text_encoder.embeddings.token_embedding.weight, text)

    te, _ = fit(tmp_path / "te", training_mode="text_encoder", text_encoder_learning_rate=1e-2)
    torch.testing.assert_close(te.unet.conv_in.weight, before["unet"].conv_in.weight)
    assert not torch.equal(te.text_encoder.final_layer_norm.weight, before["text_encoder"].final_layer_norm.weight)
    lrs = {group["lr"] for group in te.trainer.optimizers[0].param_groups}
    assert lrs == {1e-2} or max(lrs) <= 1e-2  # only the text encoder's groups, at its own rate (after warm-up)

    lora, _ = fit(tmp_path / "lora", training_mode="lora", lora_rank=2)
    assert all("lora_" in k for k in lora.trainable_keys()) and lora.trainable_keys()
    torch.testing.assert_close(lora.unet.conv_in.weight, before["unet"].conv_in.weight)


def test_checkpoints_hold_only_trained_weights_and_restore_everything(tmp_path):
    module, trainer = fit(tmp_path, training_mode="lora", lora_rank=2, lora_text_encoder=True)
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(saved) == module.trainable_keys()
    assert not any(k.startswith("vae.") for k in saved)
    assert any(k.startswith("text_encoder.") for k in saved)
    restored = LatentDiffusionModule.load_from_checkpoint(path)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, msg=key)

    resumed = LatentDiffusionModule(**{k: v for k, v in module.hparams.items() if not k.startswith("_")})
    trainer = quiet_trainer(tmp_path / "resume", max_steps=3, limit_val_batches=0)
    trainer.fit(resumed, loader(), ckpt_path=path)
    assert trainer.global_step == 3

    broken = torch.load(path, map_location="cpu", weights_only=False)
    broken["state_dict"].pop(next(iter(saved)))
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(KeyError, match="lacks 1 trained weight"):
        LatentDiffusionModule.load_from_checkpoint(tmp_path / "broken.ckpt")


def test_full_export_loads_with_from_pretrained_without_missing_or_adapter_keys(tmp_path, caplog):
    module, _ = fit(tmp_path)
    module.export_pipeline(tmp_path / "pipe")
    diffusers_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    diffusers_logging.disable_propagation()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "base_layer" not in messages and "were not used" not in messages and "newly initialized" not in messages
    torch.testing.assert_close(pipeline.unet.conv_in.weight, module.unet.conv_in.weight)
    assert not any("base_layer" in k or "lora" in k for k in pipeline.unet.state_dict())


def test_lora_export_loads_with_load_lora_weights_and_changes_the_output(tmp_path):
    module, trainer = fit(tmp_path, steps=3, training_mode="lora", lora_rank=2, learning_rate=5e-2)
    checkpoint = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(checkpoint)
    export.main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "lora")])
    assert "pytorch_lora_weights.safetensors" in [p.name for p in (tmp_path / "lora").iterdir()]

    base = build_components()
    pipeline = StableDiffusionPipeline(
        **base, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.scheduler = module.sampling_scheduler()
    plain = images(pipeline)
    pipeline.load_lora_weights(tmp_path / "lora")
    adapted = images(pipeline)
    assert (adapted - plain).abs().max() > 1e-4
    torch.testing.assert_close(adapted, images(module.build_pipeline()), atol=1e-5, rtol=1e-4)

    export.main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "merged"), "--merge-lora"])
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not any("base_layer" in k or "lora" in k for k in merged.unet.state_dict())
    torch.testing.assert_close(images(merged), adapted, atol=1e-4, rtol=1e-3)


def test_pretrained_folder_loads_and_missing_subfolders_are_named(tmp_path):
    parts = build_components({"seed": 3})
    pipeline = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(tmp_path / "sd")
    module = LatentDiffusionModule(pretrained=str(tmp_path / "sd"), training_mode="lora")
    torch.testing.assert_close(module.vae.encoder.conv_in.weight, parts["vae"].encoder.conv_in.weight)
    assert module.noise_scheduler.config.beta_schedule == parts["scheduler"].config.beta_schedule
    (tmp_path / "sd" / "vae" / "config.json").rename(tmp_path / "vae.json")
    import shutil

    shutil.rmtree(tmp_path / "sd" / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['vae'\]"):
        LatentDiffusionModule(pretrained=str(tmp_path / "sd"))


def test_prompt_dropout_noise_offset_and_long_prompts():
    module = LatentDiffusionModule(prompt_dropout=0.5)
    ids = module.tokenize(CAPTIONS)
    dropped = module.drop_condition(ids, torch.Generator().manual_seed(0))
    empty = module.tokenize([""])[0]
    rows = [torch.equal(row, empty) for row in dropped]
    assert any(rows) and not all(rows)
    with pytest.warns(UserWarning, match="truncated"):
        long = module.tokenize(["digit " * 100])
    assert long.shape == (1, module.tokenizer.model_max_length)

    sample = torch.zeros(2, 4, 8, 8)
    plain = LatentDiffusionModule().diffusion_step(sample, ids[:2], torch.Generator().manual_seed(0))
    shifted = LatentDiffusionModule(noise_offset=0.5).diffusion_step(sample, ids[:2], torch.Generator().manual_seed(0))
    assert not torch.allclose(plain.noisy, shifted.noisy)
    with pytest.raises(ValueError, match="noise_offset=-1"):
        LatentDiffusionModule(noise_offset=-1)
    with pytest.raises(ValueError, match="training_mode='adapter'"):
        LatentDiffusionModule(training_mode="adapter")


def test_latent_cache_runs_the_vae_once_per_image_and_gives_the_same_latents(tmp_path):
    module = LatentDiffusionModule(latent_cache_dir=str(tmp_path / "latents"))
    batch = collate([Captioned()[i] for i in range(4)])
    first = module.posterior_parameters(batch["images"], batch["keys"])
    assert len(list((tmp_path / "latents").rglob("*.pt"))) == 4
    calls = []
    module.vae.encode = lambda *a, **k: calls.append(1)  # a second pass must not encode
    torch.testing.assert_close(module.posterior_parameters(batch["images"], batch["keys"]), first)
    assert not calls
    direct = LatentDiffusionModule().vae.encode(batch["images"]).latent_dist.parameters
    torch.testing.assert_close(first, direct)


def test_default_prompts_are_the_validation_prompts():
    module = LatentDiffusionModule(
        validation_prompts=["a digit one", "a digit two"], validation_negative_prompts=["blurry"], num_inference_steps=2
    )
    conditions = module.condition_spec().resolve()
    assert conditions.kind == "prompt" and conditions.values == ("a digit one", "a digit two")
    assert conditions.negative_prompts == ("blurry", "blurry")
    with pytest.raises(ValueError, match="prompts is not set and the model has no default prompts"):
        LatentDiffusionModule().condition_spec().resolve()


def test_byte_level_tokenizer_round_trips_any_text(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_byte_level_tokenizer(tmp_path / "tok", model_max_length=32))
    ids = tokenizer("the digit 7 — ünïcode").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the digit 7 — ünïcode"
    assert len(ids) <= 32


def test_validation_images_use_the_ema_weights(tmp_path):
    from lightning.pytorch import Callback

    from diffusion_lightning.callbacks import EMA

    seen = {}

    class Probe(Callback):
        def on_validation_end(self, trainer, pl_module):  # after the module's hook, before EMA swaps back
            seen["unet"] = pl_module.unet.conv_in.weight.detach().clone()

    module = LatentDiffusionModule(validation_prompts=["a digit"], num_inference_steps=2, learning_rate=1e-2)
    ema = EMA(decay=0.5, use_warmup=False)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[Probe(), ema]
    )
    trainer.fit(module, loader(), loader())
    # When fitting ends the module holds the EMA weights and the averaged copy the trained ones.
    copy = dict(ema.average_model.module.named_parameters())
    raw = next(v for k, v in copy.items() if k.endswith("conv_in.weight")).detach()
    assert not torch.allclose(seen["unet"], raw)  # validation did not see the trained weights...
    torch.testing.assert_close(seen["unet"], module.unet.conv_in.weight.detach())  # ...but the averaged ones


def test_gradient_checkpointing_and_bf16_mixed_precision_train(tmp_path):
    module = LatentDiffusionModule(gradient_checkpointing=True, learning_rate=1e-3)
    assert module.unet.is_gradient_checkpointing
    before = module.unet.conv_in.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(module, loader())
    assert module.unet.conv_in.weight.dtype == torch.float32  # weights stay fp32, compute is autocast
    assert not torch.equal(module.unet.conv_in.weight, before)


def attention_processor_types(module: LatentDiffusionModule) -> set[str]:
    return {type(processor).__name__ for processor in module.unet.attn_processors.values()}


def test_attention_option_sets_the_unet_processors():
    assert attention_processor_types(LatentDiffusionModule()) == {"AttnProcessor2_0"}
    assert attention_processor_types(LatentDiffusionModule(attention="default")) == {"AttnProcessor"}
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ValueError, match=r"attention='xformers' needs the xformers package; use 'sdpa' instead"):
            LatentDiffusionModule(attention="xformers")
    elif not torch.cuda.is_available():
        with pytest.raises(ValueError, match="only available for GPU"):  # diffusers: xformers attention needs CUDA
            LatentDiffusionModule(attention="xformers")
    else:
        assert attention_processor_types(LatentDiffusionModule(attention="xformers")) == {"XFormersAttnProcessor"}


def test_compile_option_runs_training_through_torch_compile(tmp_path, monkeypatch):
    """``compile=True`` compiles the UNet in place when fitting starts, and every training forward is compiled.

    The compilation is real (TorchDynamo traces the UNet); only its backend is a recording one that
    runs the captured graphs as they are, since inductor's code generation takes a minute on a CPU.
    """
    graphs, runs = [], []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)

        def run(*args):
            runs.append(len(graphs))
            return graph.forward(*args)

        return run

    module = LatentDiffusionModule(compile=True, learning_rate=1e-3, num_inference_steps=2)
    compile_in_place = module.unet.compile

    def compile_with_recording_backend(*args, **kwargs):
        compile_in_place(*args, **{**kwargs, "backend": recording_backend})

    monkeypatch.setattr(module.unet, "compile", compile_with_recording_backend)
    before = module.unet.conv_in.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, loader())
    assert graphs and any(node.op in ("call_module", "call_function") for node in graphs[0].graph.nodes)
    assert runs.count(1) == 2, runs  # both training steps ran the UNet's first compiled graph
    assert not torch.equal(module.unet.conv_in.weight, before)  # and it trained
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert type(module.unet).__name__ == "UNet2DConditionModel"  # compiled in place, not wrapped
    assert not any("_orig_mod" in key for key in module.state_dict())  # checkpoints keep the plain names

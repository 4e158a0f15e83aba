"""The text-embedding cache: every architecture's embeddings, read back without running the encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from diffusion_lightning import (
    FluxModule,
    ImageCaptionDataModule,
    LatentDiffusionModule,
    StableDiffusion3Module,
    StableDiffusionXLModule,
)
from diffusion_lightning.utils.text_cache import TextEmbeddingCache
from tests.conftest import quiet_trainer

CAPTIONS = ["a handwritten digit zero", "a handwritten digit one", "a digit two"]
ARCHITECTURES = [LatentDiffusionModule, StableDiffusionXLModule, FluxModule, StableDiffusion3Module]


def make(cls: type, **kwargs) -> LatentDiffusionModule:
    return cls(**{"learning_rate": 1e-3, "num_inference_steps": 2, "image_size": 16, **kwargs})


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_cached_embeddings_are_the_encoders_and_a_second_read_runs_no_encoder(cls, tmp_path, monkeypatch):
    module = make(cls, text_embedding_cache_dir=str(tmp_path / "text"))
    ids = module.tokenize(CAPTIONS)
    direct = module.encode_prompt(ids)
    first = module.prompt_embeddings(ids)
    assert len(list((tmp_path / "text").rglob("*.pt"))) == len(CAPTIONS)
    torch.testing.assert_close(first[0], direct[0], rtol=0, atol=0)
    if cls is LatentDiffusionModule:
        assert first[1] is None and direct[1] is None
    else:  # SDXL, Flux and SD3 cache the pooled embeddings too
        torch.testing.assert_close(first[1], direct[1], rtol=0, atol=0)

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder ran although every prompt is cached")

    monkeypatch.setattr(module, "encode_prompt", refuse)
    for encoder in module.text_encoders:
        monkeypatch.setattr(encoder, "forward", refuse)
    again = module.prompt_embeddings(ids[[2, 0]])  # any order, any batch
    torch.testing.assert_close(again[0], first[0][[2, 0]], rtol=0, atol=0)


def test_entries_are_keyed_by_the_text_encoders_weights(tmp_path):
    root = tmp_path / "text"
    one = make(LatentDiffusionModule, text_embedding_cache_dir=str(root))
    one.prompt_embeddings(one.tokenize(CAPTIONS))
    other = make(LatentDiffusionModule, components={"seed": 1}, text_embedding_cache_dir=str(root))
    embeds = other.prompt_embeddings(other.tokenize(CAPTIONS))[0]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2  # the other encoder did not read the first's
    torch.testing.assert_close(embeds, other.encode_prompt(other.tokenize(CAPTIONS))[0], rtol=0, atol=0)


def test_a_trained_text_encoder_refuses_the_cache_naming_the_field(tmp_path):
    for kwargs in ({"train_text_encoder": True}, {"training_mode": "text_encoder"},
                   {"training_mode": "lora", "lora_text_encoder": True}):  # fmt: skip
        with pytest.raises(ValueError, match=r"text_embedding_cache_dir=.* needs frozen text encoders"):
            make(LatentDiffusionModule, text_embedding_cache_dir=str(tmp_path), **kwargs)


class EncoderCalls(Callback):
    """Counts the text encoders' forward calls inside training and validation steps."""

    def __init__(self) -> None:
        self.in_step, self.calls, self.steps = False, 0, 0

    def on_fit_start(self, trainer, pl_module) -> None:
        for encoder in pl_module.text_encoders:
            encoder.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + self.in_step))

    def on_train_batch_start(self, *args) -> None:
        self.in_step = True

    def on_train_batch_end(self, *args) -> None:
        self.in_step, self.steps = False, self.steps + 1

    on_validation_batch_start = on_train_batch_start

    def on_validation_batch_end(self, *args) -> None:
        self.in_step = False


def fit_digits(root: Path, cls: type = StableDiffusionXLModule, **kwargs) -> tuple[LatentDiffusionModule, list]:
    data = ImageCaptionDataModule(source="embedded", resolution=16, max_samples=24, batch_size=4, seed=0)
    module = make(cls, prompt_dropout=0.5, **kwargs)
    calls, losses = EncoderCalls(), []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
            losses.append(outputs["loss"].item())

    trainer = quiet_trainer(root, max_steps=4, limit_val_batches=1, callbacks=[calls, Losses()])
    trainer.fit(module, data)
    return module, [calls, losses, data]


def test_a_fit_fills_the_cache_first_and_its_steps_never_run_the_text_encoders(tmp_path):
    cache = tmp_path / "text"
    module, (calls, losses, data) = fit_digits(tmp_path / "cached", text_embedding_cache_dir=str(cache))
    assert calls.steps == 4 and calls.calls == 0
    captions = {c for ds in data.datasets.values() for c in ds.captions}
    # every caption of every split, and the empty prompt that prompt dropout trains
    assert len(list(cache.rglob("*.pt"))) == len(captions) + 1
    _, (plain_calls, plain_losses, _) = fit_digits(tmp_path / "plain")
    assert plain_calls.calls > 0  # the check above can fail
    # the same steps as without the cache (the encoders' numbers, up to their batch's rounding)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6)
    # a second run finds everything cached: no chunk encoded
    assert module.fill_text_cache(sorted(captions)) == 0


def test_a_chunk_half_written_by_a_killed_run_is_encoded_again_with_the_uninterrupted_bits(tmp_path):
    module = make(LatentDiffusionModule)
    prompts = [f"the digit {i} written by hand" for i in range(10)]
    whole = TextEmbeddingCache(tmp_path / "a", "enc")
    assert whole.fill(prompts, module.tokenize, module.encode_prompt, batch_size=4, progress=False) == 3
    # what a run killed while writing the second chunk's entries leaves: its first two files, no third chunk
    ids = module.tokenize(sorted(prompts))
    killed = TextEmbeddingCache(tmp_path / "b", "enc")
    for source, target in list(zip(whole.paths(ids), killed.paths(ids)))[:6]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    assert killed.fill(prompts, module.tokenize, module.encode_prompt, batch_size=4, progress=False) == 2
    for a, b in zip(whole.paths(ids), killed.paths(ids)):
        assert torch.equal(torch.load(a)["hidden"], torch.load(b)["hidden"])

"""AttentionHeatmapLogger and the recording attention processor."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from diffusion_lightning.callbacks.attention import AttentionHeatmapLogger
from diffusion_lightning.loggers import media
from diffusion_lightning.utils.attention import (
    AttentionRecord,
    AttentionRecorder,
    attention_processors,
    attention_statistics,
    match_layers,
)
from tests.conftest import RandomDigits, quiet_trainer, tiny_config, tiny_ddpm

MID = "mid_block.attentions.0"


def attention_ddpm(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("num_train_timesteps", 100)
    return tiny_ddpm(net=tiny_config(attention_levels=(1,), mid_attention=True), **kwargs)


def fit(tmp_path, model, callbacks, logger=False, epochs=1):
    loader = DataLoader(RandomDigits(n=8), batch_size=4)
    trainer = quiet_trainer(
        tmp_path, max_epochs=epochs, limit_val_batches=1, logger=logger, callbacks=callbacks, log_every_n_steps=1
    )
    trainer.fit(model, loader, loader)
    return trainer


def processor_types(model):
    return {name: type(p) for name, p in attention_processors(model.unet).items()}


def test_recording_processor_output_equals_original():
    model = attention_ddpm().eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 70])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        reference = model(x, t, labels)
        recorder = AttentionRecorder()
        with recorder.attached(model.unet, attention_processors(model.unet)):
            recorded = model(x, t, labels)
    torch.testing.assert_close(recorded, reference, rtol=1e-5, atol=1e-6)
    assert {r.layer for r in recorder.records} == {
        "down_blocks.1.attentions.0",
        MID,
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
    }
    for record in recorder.records:
        assert record.probs.shape == (2, 2, 16, 16)  # batch, heads (16 channels / 8), 4x4 queries, 4x4 keys
        assert record.query_hw == (4, 4) and not record.is_cross
        torch.testing.assert_close(record.probs.sum(-1), torch.ones(2, 2, 16))
        assert record.head_output_norm.shape == (2, 2) and record.output_norm.shape == (2,)
    assert set(processor_types(model).values()) == {AttnProcessor2_0}


@pytest.mark.parametrize("original", [AttnProcessor(), AttnProcessor2_0()])
def test_recording_processor_matches_cross_attention(original):
    torch.manual_seed(1)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, processor=original).eval()
    hidden, context = torch.randn(3, 9, 16), torch.randn(3, 5, 12)
    with torch.no_grad():
        reference = attn(hidden, encoder_hidden_states=context)
        recorder = AttentionRecorder(keep_last=2)
        processors = recorder.processors({"attn.processor": original}, ["attn.processor"])
        attn.set_processor(processors["attn.processor"])
        recorded = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(recorded, reference, rtol=1e-5, atol=1e-6)
    (record,) = recorder.records
    assert record.is_cross and record.query_hw == (3, 3) and record.layer == "attn"
    assert record.probs.shape == (2, 2, 9, 5)  # only the last two batch entries are kept


def test_recorder_records_only_chosen_steps():
    recorder = AttentionRecorder(steps=[1])
    model = attention_ddpm().eval()
    with torch.no_grad(), recorder.attached(model.unet, [f"{MID}.processor"]):
        for step in range(3):
            recorder.step = step
            model(torch.randn(1, 1, 8, 8), torch.tensor([5]), torch.tensor([1]))
    assert [(r.layer, r.step) for r in recorder.records] == [(MID, 1)]


def test_statistics_of_uniform_and_one_hot_attention():
    uniform = torch.full((1, 2, 4, 20), 1 / 20)
    stats = attention_statistics(uniform, top_fraction=0.1)
    torch.testing.assert_close(stats["entropy"], torch.full((2,), math.log(20)))
    torch.testing.assert_close(stats["sparsity"], torch.full((2,), 2 / 20))  # top 2 of 20 keys
    one_hot = torch.zeros(1, 2, 4, 20)
    one_hot[..., 3] = 1.0
    stats = attention_statistics(one_hot)
    torch.testing.assert_close(stats["entropy"], torch.zeros(2))
    torch.testing.assert_close(stats["sparsity"], torch.ones(2))


def test_heatmaps_of_self_and_cross_attention():
    probs = torch.zeros(1, 1, 4, 4)  # 2x2 queries and keys; every query looks at key 3, the centre query at key 0
    probs[..., 3] = 1.0
    probs[0, 0, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    record = AttentionRecord(MID, 0, probs, (2, 2), False, torch.ones(1, 1), torch.ones(1))
    received = AttentionHeatmapLogger(heatmap="received")._maps(record)
    torch.testing.assert_close(received[0, 0], torch.tensor([[0.25, 0.0], [0.0, 0.75]]))
    center = AttentionHeatmapLogger(heatmap="center")._maps(record)
    torch.testing.assert_close(center[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))

    cross = AttentionRecord("attn2", 1, torch.full((1, 2, 9, 5), 0.2), (3, 3), True, torch.ones(1, 2), torch.ones(1))
    images, scalars = AttentionHeatmapLogger()._render([cross])
    # one column per token: 5 tiles of 3x3 padded by 2, upscaled x11 to reach 32 px
    assert images["attention/attn2/t=1"].size == ((5 * (3 + 2) + 2) * 11, (3 + 2 + 2) * 11)
    assert scalars["attention/attn2/entropy"] == pytest.approx(math.log(5))
    assert scalars["attention/attn2/head1/sparsity"] == pytest.approx(0.2)


def test_fit_logs_heatmaps_and_statistics_to_tensorboard(tmp_path):
    model = attention_ddpm()
    callback = AttentionHeatmapLogger(classes=[0, 2, 1], layers=["mid_block.*"], timestep_indices=[0, -1])
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(tmp_path, model, [callback], logger=logger)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    images = [tag for tag in events.Tags()["images"] if tag.startswith("attention/")]
    assert sorted(images) == [f"attention/{MID}/t=0", f"attention/{MID}/t=2"]
    image = events.Images(f"attention/{MID}/t=0")[0]
    assert image.step == 2
    assert image.height == (3 * (4 + 2) + 2) * 8  # three classes, 4x4 tiles upscaled x8
    assert image.width > (2 * (4 + 2) + 2) * 8  # two heads, plus the row labels

    entropy = events.Scalars(f"attention/{MID}/entropy")[0].value
    assert 0.0 <= entropy <= math.log(16)
    for head in (0, 1):
        assert 0.0 <= events.Scalars(f"attention/{MID}/head{head}/entropy")[0].value <= math.log(16)
        assert 2 / 16 <= events.Scalars(f"attention/{MID}/head{head}/sparsity")[0].value <= 1.0
    assert events.Scalars(f"attention/{MID}/output_norm")[0].value > 0
    assert not any(tag.startswith("attention/down_blocks") for tag in events.Tags()["scalars"])

    # The same seed at the same weights reproduces what was logged.
    _, scalars = callback._render(callback.record(model))
    assert scalars[f"attention/{MID}/entropy"] == pytest.approx(entropy, rel=1e-5)
    assert set(processor_types(model).values()) == {AttnProcessor2_0}
    assert model.training


def test_text_to_image_unet_gives_self_and_cross_attention(tmp_path):
    from diffusion_lightning import LatentDiffusionModule
    from tests.test_latent import loader

    torch.manual_seed(0)
    module = LatentDiffusionModule(validation_prompts=["a digit one", "a digit two"], num_inference_steps=2)
    callback = AttentionHeatmapLogger(layers=["mid_block.*"], timestep_indices=[0])
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=logger, callbacks=[callback]
    )
    trainer.fit(module, loader(), loader())

    block = "mid_block.attentions.0.transformer_blocks.0"
    records = {r.layer: r for r in callback.record(module)}
    assert set(records) == {f"{block}.attn1", f"{block}.attn2"}
    self_attention, cross = records[f"{block}.attn1"], records[f"{block}.attn2"]
    assert not self_attention.is_cross and cross.is_cross
    rows, heads, queries, keys = self_attention.probs.shape
    assert rows == 2 and queries == keys  # the conditional half only: one row per prompt
    assert cross.probs.shape[-1] == module.tokenizer.model_max_length  # keys are the prompt's tokens
    torch.testing.assert_close(self_attention.probs.sum(-1), torch.ones(rows, heads, queries))

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {f"attention/{block}.attn1/t=0", f"attention/{block}.attn2/t=0"} <= set(events.Tags()["images"])
    for layer, n_keys in ((f"{block}.attn1", keys), (f"{block}.attn2", cross.probs.shape[-1])):
        assert 0.0 <= events.Scalars(f"attention/{layer}/entropy")[0].value <= math.log(n_keys)
        for head in range(heads):
            assert 0.0 < events.Scalars(f"attention/{layer}/head{head}/sparsity")[0].value <= 1.0
            assert events.Scalars(f"attention/{layer}/head{head}/output_norm")[0].value > 0


def test_processors_restored_when_sampling_raises(tmp_path, monkeypatch):
    model = attention_ddpm()
    before = processor_types(model)

    def boom(self, record):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(AttentionRecorder, "add", boom)
    with pytest.raises(RuntimeError, match="sampling failed"):
        fit(tmp_path, model, [AttentionHeatmapLogger(classes=[1])])
    assert processor_types(model) == before


def test_csv_logger_gets_scalars_only(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_WARNED", set())
    logger = CSVLogger(tmp_path, name="csv", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, attention_ddpm(), [AttentionHeatmapLogger(classes=[0], timestep_indices=[1])], logger=logger)
    assert sum("CSVLogger cannot log images" in str(w.message) for w in caught) == 1
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert f"attention/{MID}/entropy" in header and f"attention/{MID}/head1/sparsity" in header


def test_model_without_attention_is_rejected(tmp_path):
    callback = AttentionHeatmapLogger()
    with pytest.raises(ValueError, match="ClassConditionedDDPM.*no diffusers Attention modules"):
        callback.setup(quiet_trainer(tmp_path, callbacks=[callback]), tiny_ddpm(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
        ({"heatmap": "max"}, "heatmap='max'"),
        ({"timestep_indices": []}, "timestep_indices"),
        ({"top_fraction": 0.0}, "top_fraction=0.0"),
        ({"scheduler": "plms"}, "scheduler='plms'"),
        ({"colormap": "nope"}, "colormap='nope'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionHeatmapLogger(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["mid_block.*", "nope.*"]}, "layers pattern 'nope.*' matches no attention layer"),
        ({"classes": [0, 3]}, r"classes=\[0, 3\] has \[3\]; the model's classes are 0..2"),
        ({"timestep_indices": [0, 3]}, r"timestep_indices=\[0, 3\] has \[3\]; with num_inference_steps=3"),
    ],
)
def test_bad_arguments_at_setup(tmp_path, kwargs, message):
    callback = AttentionHeatmapLogger(**kwargs)
    with pytest.raises(ValueError, match=message):
        callback.setup(quiet_trainer(tmp_path, callbacks=[callback]), attention_ddpm(), "fit")


def test_match_layers_accepts_layer_and_processor_names():
    names = ["down_blocks.1.attentions.0.processor", f"{MID}.processor"]
    assert match_layers(names, [MID]) == [f"{MID}.processor"]
    assert match_layers(names, ["*.processor"]) == names
    assert match_layers(names, None) == names

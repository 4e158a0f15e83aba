import pytest
import torch

from diffusion_lightning import DigitClassifier, MNISTDataModule
from tests.conftest import quiet_trainer

TINY = dict(channels=(16, 32, 32), feature_dim=16)


def test_learns_real_digits_above_chance(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(learning_rate=5e-3, **TINY)
    data = MNISTDataModule(batch_size=64, eval_batch_size=250)
    trainer = quiet_trainer(tmp_path, max_steps=100, limit_val_batches=1, limit_test_batches=1)
    before = trainer.test(model, data, verbose=False)[0]["test/acc"]
    trainer.fit(model, data)
    after = trainer.test(model, data, verbose=False)[0]["test/acc"]
    assert after > 0.6 and after > before + 0.3


def test_features_probabilities_and_augmentation_shapes():
    model = DigitClassifier(**TINY)
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model.features(images).shape == (5, 16)
    probs = model.predict_proba(images)
    assert probs.shape == (5, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert model.training  # predict_proba restores the mode
    blank = -torch.ones(3, 1, 28, 28)
    torch.testing.assert_close(model._augment(blank), blank)  # background stays background


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(num_classes=1), "num_classes=1"), (dict(dropout=1.0), "dropout=1.0"), (dict(channels=(8, 8)), "channels")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitClassifier(**kwargs)

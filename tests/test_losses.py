import pytest
import torch
from diffusers.training_utils import compute_snr

from diffusion_lightning.losses import (
    diffusion_loss,
    elementwise_loss,
    min_snr_weights,
    predicted_original,
    snr,
    training_target,
)
from diffusion_lightning.schedulers import training_scheduler


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 4, 4, generator=g)
    noise = torch.randn(16, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    return x0, noise, t


def _alpha_sigma(scheduler, t):
    ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return ac.sqrt(), (1 - ac).sqrt()


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_targets_match_their_definitions(batch, beta_schedule):
    x0, noise, t = batch
    sched = training_scheduler(beta_schedule=beta_schedule)
    a, s = _alpha_sigma(sched, t)
    torch.testing.assert_close(training_target(sched, x0, noise, t, "epsilon"), noise)
    torch.testing.assert_close(training_target(sched, x0, noise, t, "sample"), x0)
    torch.testing.assert_close(training_target(sched, x0, noise, t, "v_prediction"), a * noise - s * x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_original_inverts_the_target(batch, prediction_type):
    x0, noise, t = batch
    sched = training_scheduler()
    noisy = sched.add_noise(x0, noise, t)
    target = training_target(sched, x0, noise, t, prediction_type)
    torch.testing.assert_close(predicted_original(sched, target, noisy, t, prediction_type), x0, atol=2e-3, rtol=1e-3)


def test_snr_is_diffusers_compute_snr(batch):
    _, _, t = batch
    sched = training_scheduler(beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(snr(sched, t), compute_snr(sched, t))
    ac = sched.alphas_cumprod[t]
    torch.testing.assert_close(snr(sched, t), (ac / (1 - ac)).float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_equals_clipped_snr_on_x0_error(batch, prediction_type):
    """Weighted loss on the network's own target == min(SNR, gamma) * |x0 - x0_hat|^2 (the paper)."""
    x0, noise, t = batch
    sched = training_scheduler()
    gamma = 5.0
    noisy = sched.add_noise(x0, noise, t)
    target = training_target(sched, x0, noise, t, prediction_type)
    prediction = target + 0.1 * torch.randn_like(target)
    weights = min_snr_weights(snr(sched, t), gamma, prediction_type)
    _, per_sample = diffusion_loss(prediction, target, loss_type="l2")
    x0_hat = predicted_original(sched, prediction, noisy, t, prediction_type)
    x0_err = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    expected = torch.clamp(snr(sched, t), max=gamma) * x0_err
    torch.testing.assert_close(weights * per_sample, expected, rtol=2e-3, atol=1e-5)


def test_min_snr_epsilon_matches_diffusers_scripts(batch):
    _, _, t = batch
    sched = training_scheduler()
    s = compute_snr(sched, t)
    expected = torch.stack([s, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / s
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), expected)
    expected_v = torch.stack([s, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / (s + 1)
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), expected_v)


def test_min_snr_is_finite_at_zero_terminal_snr():
    sched = training_scheduler(rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, 999])
    weights = min_snr_weights(snr(sched, t), 5.0, "epsilon")
    assert torch.isfinite(weights).all()
    assert weights[-1] == 1.0


def test_losses_values():
    pred, target = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0]])
    assert elementwise_loss(pred, target, "l2").tolist() == [[0.0, 9.0]]
    assert elementwise_loss(pred, target, "l1").tolist() == [[0.0, 3.0]]
    huber = elementwise_loss(pred, target, "huber", huber_c=0.1)
    assert huber[0, 0] == 0.0
    # linear tail: 2c(sqrt(9 + c^2) - c) ~= 2c * 3
    assert huber[0, 1] == pytest.approx(0.2 * (9.01**0.5 - 0.1))
    small = elementwise_loss(torch.tensor([1e-3]), torch.tensor([0.0]), "huber", huber_c=0.1)
    assert small.item() == pytest.approx(1e-6, rel=1e-2)  # quadratic near zero, like l2


def test_weighted_mean_and_per_sample():
    pred = torch.ones(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    loss, per_sample = diffusion_loss(pred, target, loss_type="l2", weights=torch.tensor([1.0, 3.0]))
    assert per_sample.tolist() == [1.0, 1.0]
    assert loss.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="weights has shape"):
        diffusion_loss(pred, target, weights=torch.ones(3))


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (
            lambda: training_target(training_scheduler(), torch.zeros(1), torch.zeros(1), torch.zeros(1).long(), "x0"),
            "prediction_type",
        ),
        (lambda: elementwise_loss(torch.zeros(1), torch.zeros(1), "mae"), "loss_type"),
        (lambda: min_snr_weights(torch.ones(1), 0.0, "epsilon"), "snr_gamma"),
        (lambda: elementwise_loss(torch.zeros(1), torch.zeros(1), "huber", huber_c=0), "huber_c"),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()

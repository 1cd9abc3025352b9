"""The tiny Llama trained 20 steps with kernels="triton" (CPU interpreter) and with
kernels="torch" from the same weights and data gives the same per-step losses: every fused
kernel's forward and backward runs inside the real model, and any gradient error would
steer the Triton run away from the PyTorch one within a few steps.

The optimiser is SGD with momentum, not Adam: Adam's per-parameter normalisation hides a
gradient that is wrong by a constant factor (and turns last-bit differences on near-zero
gradients into +-lr jumps), while SGD's update is the gradient itself, so the final
weights are compared too."""
import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU interpreter (set before triton is imported).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


from model import Config, Llama

STEPS = 20
# fp32 throughout; the two backends differ only in summation order, which training
# amplifies slowly over 20 steps. Observed: losses within 1e-6 (relative), weights within
# 1e-6 (absolute); the tolerances leave 10x headroom and still catch a 1% gradient error.
LOSS_TOL = 1e-5
WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 1e-4


def _train(backend: str, state: dict, batches) -> tuple[list[float], dict]:
    model = Llama(Config.from_name("tiny"), kernels=backend).to(DEVICE)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for idx, targets in batches:
        loss = model(idx, targets=targets, z_loss=1e-4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.slow
def test_tiny_model_trains_identically_with_triton_and_torch_kernels():
    config = Config.from_name("tiny")
    torch.manual_seed(0)
    state = Llama(config, kernels="torch").state_dict()
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(2):  # two fixed batches, alternated: the model memorises them and the loss falls
        idx = torch.randint(0, config.vocab_size, (2, 10), generator=gen)
        targets = torch.roll(idx, -1, dims=1)
        targets[:, -1] = -100  # no next token: ignored
        data.append((idx.to(DEVICE), targets.to(DEVICE)))
    batches = [data[step % 2] for step in range(STEPS)]

    triton_losses, triton_state = _train("triton", state, batches)
    torch_losses, torch_state = _train("torch", state, batches)

    assert torch_losses[-1] < torch_losses[0] - 0.5  # it really trains (and so compares something)
    for step, (a, b) in enumerate(zip(triton_losses, torch_losses)):
        assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), f"step {step}: triton {a} vs torch {b}"
    for name, value in torch_state.items():
        torch.testing.assert_close(triton_state[name], value, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=name)

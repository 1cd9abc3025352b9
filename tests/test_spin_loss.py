"""finetune.spin.spin_loss against the formula computed by hand, and its gradient direction."""
import math

import torch

from finetune.losses import sequence_logps
from finetune.spin import spin_loss


def test_spin_loss_matches_hand_formula():
    pr, pg = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rr, rg = torch.tensor([-11.0, -19.0]), torch.tensor([-11.5, -16.0])
    beta = 0.1
    loss, m = spin_loss(pr, pg, rr, rg, beta)
    by_hand = []
    for a, b, c, d in zip(pr.tolist(), pg.tolist(), rr.tolist(), rg.tolist()):
        z = beta * ((a - c) - (b - d))
        by_hand.append(-math.log(1 / (1 + math.exp(-z))))
    assert math.isclose(loss.item(), sum(by_hand) / 2, rel_tol=1e-6)
    assert math.isclose(m["rewards/real"], beta * ((-10 + 11) + (-20 + 19)) / 2, abs_tol=1e-6)
    assert math.isclose(m["rewards/generated"], beta * ((-12 + 11.5) + (-15 + 16)) / 2, abs_tol=1e-6)
    assert m["rewards/accuracies"] == 0.5  # row 0: 0.1 > -0.05; row 1: -0.1 < 0.1
    assert math.isclose(m["rewards/margins"], m["rewards/real"] - m["rewards/generated"], abs_tol=1e-6)
    assert math.isclose(m["logps/real"], -15.0) and math.isclose(m["logps/generated"], -13.5)


def test_spin_gradient_raises_real_relative_to_generated():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, -100, 7, 8, 9, 2]])
    ref = sequence_logps(logits.detach(), labels)

    def ratio(lg):
        lp = sequence_logps(lg, labels)
        return (lp[0] - ref[0]) - (lp[1] - ref[1])

    lp = sequence_logps(logits, labels)
    loss, _ = spin_loss(lp[:1], lp[1:], ref[:1], ref[1:], beta=0.1)
    loss.backward()
    stepped = logits.detach() - 1.0 * logits.grad
    assert ratio(stepped).item() > ratio(logits.detach()).item() + 1e-3


def test_sequence_logps_ignores_masked_positions_only():
    """Log-probs count response tokens only. The prompt positions' logits are replaced by
    different random ones (a per-position constant would be invisible to log_softmax), and
    the row sums must not move; the same change at a response position must move them."""
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, -100, 7, 8, 9, 2]])
    ref = sequence_logps(logits, labels)
    masked = labels == -100

    other = logits.clone()
    other[masked] = torch.randn(int(masked.sum()), 11) * 5.0
    # The change really changes the log-probs of the labels at those positions...
    changed = torch.log_softmax(other, -1)[masked] - torch.log_softmax(logits, -1)[masked]
    assert changed.abs().amax().item() > 1.0
    # ...and none of it reaches the sequence log-prob.
    torch.testing.assert_close(sequence_logps(other, labels), ref)

    # The control: the same kind of change at one response position of row 0 does reach it.
    response = other.clone()
    response[0, 3] = torch.randn(11) * 5.0
    moved = sequence_logps(response, labels)
    assert abs(moved[0].item() - ref[0].item()) > 1e-2
    torch.testing.assert_close(moved[1], ref[1])

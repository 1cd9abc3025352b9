"""Response log-probabilities and the SPIN loss.

SPIN (Chen et al. 2024) with reference = the previous iterate θt, chosen = the human ("real")
answer, rejected = θt's own ("generated") answer; it is the DPO sigmoid loss:

    loss = -log σ( β·[(log πθ(y|x) − log πθt(y|x)) − (log πθ(y'|x) − log πθt(y'|x))] )

with log-probs summed over response tokens only. Metrics are named as TRL's DPO trainer
names them (rewards/real = rewards/chosen there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.chat import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(labels[t] | ...) where labels != -100; logits (B, T, V) -> (B,).

    `labels` are already shifted (labels[t] is the token after input t, as sft_row builds
    them). log_softmax runs in fp32 so bf16 logits do not lose the small differences SPIN
    trains on.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def spin_loss(policy_real_logps: torch.Tensor, policy_generated_logps: torch.Tensor,
              ref_real_logps: torch.Tensor, ref_generated_logps: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean SPIN loss over the batch and its metrics (detached 0-dim tensors on the loss's device:
    the training engine sums them there and reads them once per optimizer step, not per micro-batch)."""
    real_logratio = policy_real_logps - ref_real_logps
    generated_logratio = policy_generated_logps - ref_generated_logps
    logits = beta * (real_logratio - generated_logratio)
    # logsigmoid is the numerically stable form of log(sigmoid(x)).
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        rewards_real = beta * real_logratio
        rewards_generated = beta * generated_logratio
        metrics = {
            "loss": loss.detach(),
            "rewards/real": rewards_real.mean(),
            "rewards/generated": rewards_generated.mean(),
            "rewards/accuracies": (rewards_real > rewards_generated).float().mean(),
            "rewards/margins": (rewards_real - rewards_generated).mean(),
            "logps/real": policy_real_logps.mean(),
            "logps/generated": policy_generated_logps.mean(),
        }
    return loss, metrics

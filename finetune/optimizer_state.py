"""An optimizer's state written after one SPIN iteration and read into the next one's optimizer
(spin.py --carry-optimizer-state), sharded as FSDP2 holds it.

Each SPIN iteration builds a fresh optimizer on θt. RMSprop (the paper's) has no bias
correction: a fresh one divides the first gradients by the root of a nearly empty running
average, so each iteration opens with steps several times the nominal lr. Carrying the state
(running averages and the step count) over from the previous iteration avoids that restart.

Only the optimizer's state is written (torch.distributed.checkpoint, one file per rank and a
metadata file), not the model's weights: θt+1's weights are in SPIN_DIR/iter{t+1} already.
Written under a temporary name and renamed, so a directory that exists is complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from pretrain.parallel import unwrap


def _plain(optimizer):
    # fabric.setup_optimizers wraps the torch optimizer; the state-dict helpers need the torch one.
    return getattr(optimizer, "optimizer", optimizer)


def save_optimizer_state(fabric, model, optimizer, path: Path) -> Path:
    """Write `optimizer`'s state to directory `path` (collective: every rank calls it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if fabric.global_rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash
    fabric.barrier()
    state = get_optimizer_state_dict(unwrap(model), _plain(optimizer))
    dcp.save({"optimizer": state}, checkpoint_id=str(tmp))
    fabric.barrier()
    if fabric.global_rank == 0:
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    fabric.barrier()
    return path


def load_optimizer_state(fabric, model, optimizer, path: Path) -> None:
    """Fill `optimizer` (built on `model`, no step taken yet) with the state saved at `path`."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: no saved optimizer state (--carry-optimizer-state reads the state the "
                                f"previous iteration wrote; that iteration ran without the flag). Re-run with "
                                f"the flags the run started with, or use a new --out")
    # The template has the saved state's shapes: get_optimizer_state_dict initialises a fresh
    # optimizer's state (zeros) so that DCP can load into it in place.
    state = {"optimizer": get_optimizer_state_dict(unwrap(model), _plain(optimizer))}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(unwrap(model), _plain(optimizer), optim_state_dict=state["optimizer"])
    fabric.barrier()

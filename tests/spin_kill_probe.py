"""finetune/spin.py run in this process, killed (SIGKILL, as by the OOM killer) by itself
when generation reaches row K: the kill lands at a row the test chooses, not at whatever row
a polling test happened to see.

    python tests/spin_kill_probe.py K SPIN_ARGS...

Each call of finetune.generate.generate_batch makes one batch of rows, so with
`--gen-batch-size 1` exactly K rows are on disk when the process dies.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import finetune.generate as generate  # noqa: E402

kill_at, batches = int(sys.argv[1]), 0
real_generate_batch = generate.generate_batch


def generate_batch(*args, **kwargs):
    global batches
    if batches == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    batches += 1
    return real_generate_batch(*args, **kwargs)


generate.generate_batch = generate_batch
sys.argv = [str(REPO / "finetune" / "spin.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")

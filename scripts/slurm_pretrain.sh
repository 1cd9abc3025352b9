#!/bin/bash
# Multi-node TinyLlama-1.1B pretraining on SLURM: 4 nodes x 8 GPUs, one SLURM task per GPU.
# Submit with:  sbatch scripts/slurm_pretrain.sh      (adjust partition, paths and sizes)
#
# srun starts every rank itself and Fabric reads SLURM's variables (rank, world size, master
# address), so no `fabric run`/torchrun agent sits in between; --devices/--num-nodes must match
# the allocation below.
#
# Preemption and the time limit: SLURM signals the batch shell 120 s before the end
# (--signal=B:USR1@120); the trap forwards SIGUSR1 through srun to every rank, each saves a
# checkpoint at its next step boundary and exits 0, and the job requeues itself. The next run
# continues from the newest complete checkpoint (--resume auto); a checkpoint cut off mid-write
# is ignored. The checkpoint holds sharded state that loads on any number of nodes and with
# any --sharding, so a requeued job may get a different allocation (change the sizes above).
#
# --sharding hsdp (the default) shards within each node and replicates across nodes:
# docs/pretrain.md ("Sharding") compares it with fsdp and ddp.
#SBATCH --job-name=tinyllama-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
DATA_ROOT=${DATA_ROOT:-/data/tinyllama}    # data_prep output: slimpajama/train, starcoder/train (+ */validation)
OUT=${OUT:-/checkpoints/tinyllama-1.1b}
TOKENIZER=${TOKENIZER:-$DATA_ROOT/tokenizer.model}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=4

srun --kill-on-bad-exit=1 python pretrain/tinyllama.py \
    --accelerator cuda --devices "$SLURM_NTASKS_PER_NODE" --num-nodes "$SLURM_NNODES" \
    --sharding hsdp --config tinyllama-1.1b --data-root "$DATA_ROOT" --tokenizer "$TOKENIZER" --out "$OUT" \
    --global-batch-size 1024 --micro-batch-size 8 --save-every 1000 --keep-last 3 \
    --log-every 10 --val-every 1000 --resume auto &
SRUN_PID=$!

on_usr1() {
  echo "$(date): time limit or preemption: asking every rank to checkpoint, then requeueing"
  kill -USR1 "$SRUN_PID" 2>/dev/null || true   # srun forwards SIGUSR1 to all tasks
  wait "$SRUN_PID" || true
  scontrol requeue "$SLURM_JOB_ID"
}
trap on_usr1 USR1

# `wait` returns early when the trap fires; wait again for the ranks to finish saving.
wait "$SRUN_PID" || wait "$SRUN_PID"

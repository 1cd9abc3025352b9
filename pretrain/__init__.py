"""pretrain: FSDP2 pretraining with Lightning Fabric (docs/pretrain.md).

    tinyllama.py    the training script (CLI, loop)
    data.py         weighted mixture of token shards; sample i is a pure function of (seed, i)
    schedule.py     warmup + cosine learning rate
    parallel.py     Fabric + FSDP2 setup, gradient clipping        (also used by finetune/)
    checkpoint.py   atomic sharded checkpoints, consolidated models (also used by finetune/)
    metrics.py      metrics.jsonl, wandb, peak FLOP/s and memory    (also used by finetune/)
    consolidate.py  training checkpoint -> Llama.save format (CLI)
"""

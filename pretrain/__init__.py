"""pretrain: FSDP2 pretraining with Lightning Fabric, and the training engine SFT and SPIN share (docs/pretrain.md).

    tinyllama.py    the pretraining script: its options, data and loss on the engine
    engine.py       the training engine of all three stages: Fabric/FSDP2 setup, seeded init,
                    the optimizer step, throughput/MFU/memory                (also used by finetune/)
    options.py      typed options: dataclass -> flags, validation, OUT/config.yaml  (also used by finetune/)
    parallel.py     FSDP2 sharding, gradient sync and clipping (driven by engine.py)
    schedule.py     warmup + cosine/linear/constant learning rate           (also used by finetune/)
    data.py         weighted mixture of token shards; sample i is a pure function of (seed, i)
    checkpoint.py   atomic sharded checkpoints, consolidated models         (also used by finetune/)
    metrics.py      metrics.jsonl, wandb, peak FLOP/s and memory
    consolidate.py  training checkpoint -> Llama.save format (CLI)
"""

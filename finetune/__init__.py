"""finetune: see README."""

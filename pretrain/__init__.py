"""pretrain: see README."""

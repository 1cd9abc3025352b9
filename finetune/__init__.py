"""finetune: chat data and template, batched KV-cache generation, SFT (sft.py) and SPIN (spin.py).

See docs/spin.md for the commands, the output layout and the design choices.
"""

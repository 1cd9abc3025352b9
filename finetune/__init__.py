"""finetune: chat data and template, batched KV-cache generation, SFT (sft.py) and SPIN (spin.py),
and what scripts/generate.py and scripts/chat.py use to talk to a model (inference.py, conversation.py).

See docs/spin.md for the commands, the output layout and the design choices.
"""

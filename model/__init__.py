"""The Llama-2 model, its named configs, and HF weight import/export.

`Llama` and `KVCache` load on first use (PEP 562), so torch-free parts (model.config,
model.atomic, used by data_prep) import without torch.
"""
from model.config import PRESETS, Config

__all__ = ["Config", "Llama", "KVCache", "PRESETS"]


def __getattr__(name: str):
    if name in ("Llama", "KVCache"):
        from model import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")

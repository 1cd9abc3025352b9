"""The Llama-2 model, its named configs, and HF weight import/export."""
from model.config import PRESETS, Config
from model.llama import KVCache, Llama

__all__ = ["Config", "Llama", "KVCache", "PRESETS"]

"""phi3skip: make Phi-3 models skippable by distillation, in plain PyTorch.

Names are imported on first use, so `phi3skip.data.corpus` or `prepare.py` do not pay for importing torch.
"""
from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {
    "Phi3Config": "model.config", "Phi3ForCausalLM": "model.model", "InvalidSkip": "model.skipsets",
    "validate_skip": "model.skipsets", "KVCache": "model.kv_cache", "from_pretrained": "formats.checkpoints",
    "save_pretrained": "formats.checkpoints", "save_checkpoint": "formats.checkpoints",
    "load_config": "formats.checkpoints", "UserError": "core.cli",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'phi3skip' has no attribute {name!r}")

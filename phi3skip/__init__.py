"""phi3skip: make Phi-3 models skippable by distillation, in plain PyTorch."""
from .cli import UserError
from .config import Phi3Config
from .io import from_pretrained, load_config, save_checkpoint, save_pretrained
from .kv_cache import KVCache
from .model import InvalidSkip, Phi3ForCausalLM, validate_skip

__version__ = "0.1.0"
__all__ = ["Phi3Config", "Phi3ForCausalLM", "KVCache", "from_pretrained", "save_pretrained", "save_checkpoint",
           "load_config", "validate_skip", "InvalidSkip", "UserError"]

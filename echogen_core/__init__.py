"""echogen_core: Infinity and EchoGen in plain PyTorch (no ComfyUI imports here)."""

__version__ = "0.1.0"

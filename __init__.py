"""ComfyUI entry point of the EchoGen node pack.

ComfyUI imports this file from custom_nodes/. Importing it without ComfyUI (tests, plain Python) works too:
the node classes only touch ComfyUI through nodes/comfy_bridge.py, lazily.
"""
try:  # inside ComfyUI this file is imported as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:  # imported as a plain module (e.g. by pytest's rootdir conftest)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

"""ComfyUI nodes of the EchoGen pack. Node ids are stable: saved workflows refer to them."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

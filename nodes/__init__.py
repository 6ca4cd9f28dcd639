"""ComfyUI nodes of the EchoGen pack. Node ids are stable: saved workflows refer to them."""
from . import comfy_bridge
from .loaders import (EchoGenContentEncoderLoader, EchoGenModelLoader, EchoGenSegmenterLoader,
                      EchoGenSemanticEncoderLoader, EchoGenTextEncoderLoader, EchoGenVAELoader)
from .sampling import EchoGenDecode, EchoGenGuidance, EchoGenSampler, EchoGenTextEncode
from .subject_nodes import EchoGenContentEncode, EchoGenSemanticEncode, EchoGenSubjectSegmenter

NODE_CLASS_MAPPINGS = {
    "EchoGenModelLoader": EchoGenModelLoader,
    "EchoGenVAELoader": EchoGenVAELoader,
    "EchoGenTextEncoderLoader": EchoGenTextEncoderLoader,
    "EchoGenSemanticEncoderLoader": EchoGenSemanticEncoderLoader,
    "EchoGenContentEncoderLoader": EchoGenContentEncoderLoader,
    "EchoGenSegmenterLoader": EchoGenSegmenterLoader,
    "EchoGenSubjectSegmenter": EchoGenSubjectSegmenter,
    "EchoGenSemanticEncode": EchoGenSemanticEncode,
    "EchoGenContentEncode": EchoGenContentEncode,
    "EchoGenTextEncode": EchoGenTextEncode,
    "EchoGenGuidance": EchoGenGuidance,
    "EchoGenSampler": EchoGenSampler,
    "EchoGenDecode": EchoGenDecode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EchoGenModelLoader": "EchoGen Model Loader",
    "EchoGenVAELoader": "EchoGen VAE Loader (BSQ)",
    "EchoGenTextEncoderLoader": "EchoGen Text Encoder Loader (Flan-T5)",
    "EchoGenSemanticEncoderLoader": "EchoGen Semantic Encoder Loader (DINOv2)",
    "EchoGenContentEncoderLoader": "EchoGen Content Encoder Loader (FLUX VAE)",
    "EchoGenSegmenterLoader": "EchoGen Segmenter Loader",
    "EchoGenSubjectSegmenter": "EchoGen Subject Segmenter",
    "EchoGenSemanticEncode": "EchoGen Semantic Encode",
    "EchoGenContentEncode": "EchoGen Content Encode",
    "EchoGenTextEncode": "EchoGen Text Encode",
    "EchoGenGuidance": "EchoGen Guidance",
    "EchoGenSampler": "EchoGen Sampler",
    "EchoGenDecode": "EchoGen Decode",
}

comfy_bridge.register_model_folders()
comfy_bridge.register_routes()

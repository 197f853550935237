"""ComfyUI-WaveFT: ComfyUI's stock LoRA loader nodes apply WaveFT files (`waveft-train export --format waveft`).

Install: copy or link this folder into `ComfyUI/custom_nodes/`, restart ComfyUI, put the `.safetensors` file in
`models/loras/` and use "Load LoRA" (or "LoraLoaderModelOnly") as for any LoRA; `strength_model` multiplies the
learned update. Needs torch only. Outside ComfyUI (waveft-train's tests) importing it registers nothing.
"""

from .waveft_format import FORMAT_VERSION, UnsupportedWaveFTFile, delta_weight, read_layer

try:
    from comfy import weight_adapter
except ImportError:  # not inside ComfyUI
    weight_adapter = None

if weight_adapter is not None:
    from .adapter import WaveFTAdapter

    if not any(getattr(adapter, "name", None) == WaveFTAdapter.name for adapter in weight_adapter.adapters):
        weight_adapter.adapters.append(WaveFTAdapter)

NODE_CLASS_MAPPINGS: dict = {}  # no nodes of its own: the stock LoRA loaders do the work
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
__all__ = ["FORMAT_VERSION", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "UnsupportedWaveFTFile", "delta_weight",
           "read_layer"]

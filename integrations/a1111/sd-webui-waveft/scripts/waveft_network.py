"""sd-webui-waveft: AUTOMATIC1111's built-in Lora extension applies WaveFT files (`waveft-train export --format waveft`).

Install: link (or copy with `cp -rL`, which resolves the link to the shared reader) this folder into
`stable-diffusion-webui/extensions/`, restart, put the file in `models/Lora/` and write `<lora:name:1>` in the prompt;
the number multiplies the learned update. The Lora extension's `networks.module_types` is its list of weight
formats; this script, loaded after the built-in extensions, puts a WaveFT type first. Needs torch only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load_reader():
    """waveft_format.py beside this folder (scripts/ holds only what the webui should run as a script)."""
    path = Path(__file__).resolve().parent.parent / "waveft_format.py"
    spec = importlib.util.spec_from_file_location("sd_webui_waveft_format", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


waveft_format = _load_reader()

try:  # the built-in Lora extension's modules, importable once its own script has loaded
    import network
    import networks
except ImportError:
    network = networks = None


if network is not None:

    class NetworkModuleWaveFT(network.NetworkModule):
        def __init__(self, net, weights):
            super().__init__(net, weights)
            self.record = waveft_format.read_layer(weights.w, "")
            self.diff_bias = weights.w.get("diff_b")

        def calc_updown(self, orig_weight):
            """(ΔW, bias change) in the weight's dtype; finalize_updown applies the prompt's multiplier."""
            delta = waveft_format.delta_weight(self.record, tuple(orig_weight.shape[:2]), device=orig_weight.device)
            diff_bias = None
            if self.diff_bias is not None:
                diff_bias = self.diff_bias.to(device=orig_weight.device, dtype=orig_weight.dtype)
            return self.finalize_updown(delta.to(orig_weight.dtype), orig_weight, orig_weight.shape, diff_bias)

    class ModuleTypeWaveFT:
        def create_module(self, net, weights):
            return NetworkModuleWaveFT(net, weights) if "waveft_spectrum" in weights.w else None

    if not any(type(module_type).__name__ == "ModuleTypeWaveFT" for module_type in networks.module_types):
        networks.module_types.insert(0, ModuleTypeWaveFT())

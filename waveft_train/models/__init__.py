"""SDXL models: the built-in names `tiny` and `toy` (builtin), loading components from the hub, a folder or a
built-in name (loading), the one SDXL builder at any size (architecture, used by tiny and by the toy recipe), the
tiny model's cached build (tiny, tokenizer files in tokenizer) and the diffusers <-> ldm module names (unet_names)."""

"""The final adapter's README.md model card, and the caveats it (and the start of training) states.

Only information about the adapter belongs here: what it is, how it was trained, how stock diffusers + peft load
it, and when stock peft would not reproduce it.
"""

from __future__ import annotations

from waveft_train.common.paths import is_single_file
from waveft_train.config import DataSection, PriorSection, TrainSection, WaveFTSection
from waveft_train.models.single_file import DEFAULT_CONFIG
from waveft_train.waveft import STOCK_PEFT_FAMILIES_TEXT, stock_peft_reproduces_family


def stock_peft_caveats(waveft: WaveFTSection) -> list[str]:
    """Why stock peft would not reproduce this run's adapter, if it would not (warned at the start, and in the card)."""
    load_with_us = ("Load it with waveft-train (`waveft-train sample`, or `waveft_train.waveft.register()` before "
                    "`PeftModel.from_pretrained`), or export it merged (`waveft-train export`).")
    caveats = []
    if waveft.use_idwt and not stock_peft_reproduces_family(waveft.wavelet_family):
        caveats.append(f"stock peft does not reproduce this adapter: its WaveFT has correct filters only for the "
                       f"wavelet families {STOCK_PEFT_FAMILIES_TEXT}, and fails on `{waveft.wavelet_family}` "
                       f"or gives other outputs. {load_with_us}")
    return caveats


def _pipeline_loader(base_model: str, base_config: str | None) -> str:
    """How stock diffusers loads the base: from_pretrained, or from_single_file with its configs for a single file."""
    if is_single_file(base_model):
        return f'from_single_file("{base_model}", config="{base_config or DEFAULT_CONFIG}"'
    return f'from_pretrained("{base_model}"'


def model_card(*, base_model: str, waveft: WaveFTSection, data: DataSection, prior: PriorSection, train: TrainSection,
               validation_prompts: list[str], trainable_params: int, steps: int, has_samples: bool,
               prediction_type: str | None = None, base_config: str | None = None) -> str:
    """README.md of the final adapter: what it is, how it was trained, how to load it with stock peft.

    `prediction_type` is what the adapter was trained to predict when it differs from the base model's scheduler
    (train.prediction_type); the snippet then configures the scheduler for it. A single-file `base_model` loads with
    `from_single_file`, its configs from `base_config` (model.config).
    """
    samples = "\n![Validation samples: base model left, adapter right](samples.png)\n" if has_samples else ""
    notes = "".join(f"**Note:** {note}\n\n" for note in stock_peft_caveats(waveft))
    prompts = "\n".join(f"- `{prompt}`" for prompt in validation_prompts) or "- (none)"
    encoders = ("pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, \"path/to/this/adapter/text_encoder\")\n"
                "pipe.text_encoder_2 = PeftModel.from_pretrained(pipe.text_encoder_2, "
                "\"path/to/this/adapter/text_encoder_2\")\n" if waveft.text_encoders else "")
    scheduler = (f"pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, "
                 f"prediction_type=\"{prediction_type}\")  # what this adapter was trained to predict\n"
                 if prediction_type else "")
    return f"""---
library_name: peft
base_model: {base_model}
tags: [waveft, dreambooth, stable-diffusion-xl, waveft-train]
---
# WaveFT adapter for `{base_model}`

Trained with waveft-train: DreamBooth{' with prior preservation' if prior.enabled else ''} on the
instance prompt `{data.instance_prompt}`, {steps} steps.

| setting | value |
|---|---|
| n_frequency | {waveft.n_frequency} |
| scaling | {waveft.scaling} |
| wavelet_family | {waveft.wavelet_family} |
| use_idwt | {waveft.use_idwt} |
| random_loc_seed | {waveft.random_loc_seed} |
| target_modules | {waveft.target_modules} |
| text encoders | {"trained too (text_encoder/, text_encoder_2/)" if waveft.text_encoders else "frozen"} |
| trainable parameters | {trainable_params:,} |
| optimizer | {train.optimizer} |
| learning rate | {train.learning_rate} ({train.lr_scheduler}) |
| weights saved | {f"EMA of the trained weights (decay {train.ema_decay})" if train.ema_decay else "the trained weights"} |
| batch | {train.batch_size} x {train.gradient_accumulation} accumulation |
| resolution | {data.resolution} |
| class prompt | {prior.class_prompt if prior.enabled else '(no prior preservation)'} |
| prediction type | {prediction_type or "the base model's scheduler's"} |

Validation prompts:
{prompts}
{samples}
## Use it with stock diffusers + peft

```python
import torch
from diffusers import StableDiffusionXLPipeline
from peft import PeftModel

pipe = StableDiffusionXLPipeline.{_pipeline_loader(base_model, base_config)}, torch_dtype=torch.float16).to("cuda")
pipe.unet = PeftModel.from_pretrained(pipe.unet, "path/to/this/adapter")
{encoders}{scheduler}image = pipe("{data.instance_prompt}", num_inference_steps=25).images[0]
```

{notes}With waveft-train installed, in one line on the same pipeline (strength changeable between images; this also
sets the scheduler's prediction type):

```python
import waveft_train

waveft_train.load_adapter(pipe, "path/to/this/adapter", scale=1.0)  # set_adapter_scale(pipe, s), unload_adapter(pipe)
```

Or: `waveft-train sample --adapter path/to/this/adapter --prompt "{data.instance_prompt}" --out grid.png`. For ComfyUI:
`waveft-train export --adapter path/to/this/adapter --format waveft --out this.safetensors` and the WaveFT node
(integrations/comfyui in waveft-train's repository).
"""

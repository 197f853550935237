"""The run's files: output-folder guard, atomic writes, metrics.jsonl, summary.json and the model card."""

from __future__ import annotations

import json
import math
import resource
import shutil
from pathlib import Path

import torch

from waveft_train.config import TrainConfig, config_fingerprint, load_config
from waveft_train.errors import UserError
from waveft_train.files import atomic_write_text


def holds_other_run(config: TrainConfig, *, force: bool) -> bool:
    """True when output.dir holds a run with a different config and --force allows replacing it.

    Read-only, so every process can call it; without --force such a folder is refused.
    """
    output_dir = Path(config.output.dir)
    previous = output_dir / "config.yaml"
    if not previous.exists():
        return False
    if not any((output_dir / name).exists() for name in RUN_OUTPUTS):
        return True  # a config.yaml and nothing it produced (e.g. a run that failed at its start): nothing to lose
    try:
        same = config_fingerprint(load_config(previous)) == config_fingerprint(config)
    except UserError as error:
        if not force:
            lines = str(error).splitlines()
            problems = " ".join(line.strip() for line in lines[1:]) or lines[0]  # past the "invalid config" heading
            raise UserError(
                f"The output folder {output_dir} (output.dir) holds a run whose {previous} does not load with this "
                f"version of waveft-train ({problems}), so that run cannot be resumed. Choose another output.dir, or "
                "pass --force to discard that run's checkpoints, samples and metrics."
            ) from None
        same = False
    if not same and not force:
        raise UserError(
            f"The output folder {output_dir} (output.dir) holds a run with a different config ({previous}). "
            "Rerunning with the same config resumes that run; to train something else, choose another output.dir, "
            "or pass --force to discard that run's checkpoints, samples and metrics."
        )
    return not same


RUN_OUTPUTS = ("checkpoints", "samples", "adapter", "metrics.jsonl", "summary.json")  # what a run writes


def clear_previous_run(output_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def validate_inputs(config: TrainConfig) -> None:
    """Data checks that need no model: missing, empty or corrupt image folders fail in seconds."""
    from waveft_train.data import validate_image_folder

    instance = Path(config.data.instance_dir)
    if instance.is_absolute() or instance.exists():
        validate_image_folder(instance, config_key="data.instance_dir", role="instance")
    if config.prior.enabled:
        validate_image_folder(Path(config.prior.class_dir), config_key="prior.class_dir", role="class", allow_empty=True)


class MetricsLog:
    """metrics.jsonl, one line per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

        self.last = json.loads(kept[-1]) if kept else None

    def write(self, record: dict) -> None:
        # strict JSON: a non-finite value (an fp16 overflow step's grad norm) is written as null
        record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in record.items()}
        self.last = record
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def stock_peft_caveats(config: TrainConfig) -> list[str]:
    """Why stock peft would not reproduce this run's adapter, if it would not (warned at the start, and in the card)."""
    from waveft_train.waveft import STOCK_PEFT_FAMILIES_TEXT, stock_peft_reproduces_family

    load_with_us = ("Load it with waveft-train (`waveft-train sample`, or `waveft_train.waveft.register()` before "
                    "`PeftModel.from_pretrained`), or export it merged (`waveft-train export`).")
    caveats = []
    if config.waveft.bias == "waveft_only":
        caveats.append("this adapter trains a `waveft_bias` per layer (`waveft.bias: waveft_only`), which stock peft "
                       f"drops without an error when it loads the adapter. {load_with_us}")
    if config.waveft.use_idwt and not stock_peft_reproduces_family(config.waveft.wavelet_family):
        caveats.append(f"stock peft does not reproduce this adapter: its WaveFT has correct filters only for the "
                       f"wavelet families {STOCK_PEFT_FAMILIES_TEXT}, and fails on `{config.waveft.wavelet_family}` "
                       f"or gives other outputs. {load_with_us}")
    return caveats


def model_card(config: TrainConfig, *, base_model: str, trainable_params: int, steps: int, has_samples: bool) -> str:
    """README.md of the final adapter: what it is, how it was trained, how to load it with stock peft."""
    waveft = config.waveft
    samples = "\n![Validation samples: base model left, adapter right](samples.png)\n" if has_samples else ""
    notes = "".join(f"**Note:** {note}\n\n" for note in stock_peft_caveats(config))
    prompts = "\n".join(f"- `{prompt}`" for prompt in config.validation.prompts) or "- (none)"
    return f"""---
library_name: peft
base_model: {base_model}
tags: [waveft, dreambooth, stable-diffusion-xl, waveft-train]
---
# WaveFT adapter for `{base_model}`

Trained with waveft-train: DreamBooth{' with prior preservation' if config.prior.enabled else ''} on the
instance prompt `{config.data.instance_prompt}`, {steps} steps.

| setting | value |
|---|---|
| n_frequency | {waveft.n_frequency} |
| scaling | {waveft.scaling} |
| wavelet_family | {waveft.wavelet_family} |
| use_idwt | {waveft.use_idwt} |
| random_loc_seed | {waveft.random_loc_seed} |
| target_modules | {waveft.target_modules} |
| trainable parameters | {trainable_params:,} |
| learning rate | {config.train.learning_rate} ({config.train.lr_scheduler}) |
| batch | {config.train.batch_size} x {config.train.gradient_accumulation} accumulation |
| resolution | {config.data.resolution} |
| class prompt | {config.prior.class_prompt if config.prior.enabled else '(no prior preservation)'} |

Validation prompts:
{prompts}
{samples}
## Use it with stock diffusers + peft

```python
import torch
from diffusers import StableDiffusionXLPipeline
from peft import PeftModel

pipe = StableDiffusionXLPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.unet = PeftModel.from_pretrained(pipe.unet, "path/to/this/adapter")
image = pipe("{config.data.instance_prompt}", num_inference_steps=25).images[0]
```

{notes}Or: `waveft-train sample --adapter path/to/this/adapter --prompt "{config.data.instance_prompt}" --out grid.png`.
"""

"""The run's typed schema: one pydantic section per YAML section, every field documented where it is defined.

Why typed and strict: a typo must fail in the first second of a GPU run, with a message that names the key and
suggests the fix, instead of being silently ignored. Every section rejects unknown keys, true/false where a number
belongs, and non-finite numbers. Each field's `description` is its one documentation: the config
reference and `waveft-train init`'s starter config are generated from it (`config/docs.py`). Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from waveft_train.common.paths import is_pickle_checkpoint, is_single_file
from waveft_train.config.concepts import ConceptSection, concept_problems
from waveft_train.config.cross_checks import TEXT_ENCODER_FIELDS, check_text_encoder_settings
from waveft_train.config.fields import Prompt, Resolution, Section, UnitInterval, doc
from waveft_train.waveft.families import ALLOWED_FAMILIES_TEXT, is_supported_family

LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
# diffusers' get_scheduler passes num_warmup_steps to every scheduler but "constant", which ignores it.
WARMUP_SCHEDULERS: tuple[str, ...] = tuple(name for name in get_args(LrScheduler) if name != "constant")
Tracker = Literal["tensorboard", "wandb"]  # accelerate's names for them
TRACKERS: tuple[str, ...] = get_args(Tracker)


class ModelSection(Section):
    """Which SDXL to personalize, in which precision."""

    pretrained: str = doc("tiny", "`tiny` (embedded test model, random weights), `toy` (the pretrained toy-world model, "
                          "see docs/toy-world.md), a hub id, a local diffusers folder, or an SDXL checkpoint file in "
                          "the A1111/ComfyUI layout (`.safetensors`; see docs/base-models.md)",
                          example="stabilityai/stable-diffusion-xl-base-1.0", min_length=1)
    config: str | None = doc(None, "for a single-file `model.pretrained`: where its component configs and tokenizers "
                             "come from, a hub id or local diffusers folder of its architecture; null = "
                             "stabilityai/stable-diffusion-xl-base-1.0 (SDXL base and its fine-tunes: Pony, Illustrious, "
                             "...). A hub id's few hundred kB are fetched once, then read offline", min_length=1)
    revision: str | None = doc(None, "hub branch, tag or commit of `model.pretrained` (a hub id)")
    vae: str | None = doc(None, "a separate AutoencoderKL (hub id or folder); the stock SDXL VAE overflows in fp16, so "
                          "use an fp16-safe one such as madebyollin/sdxl-vae-fp16-fix", example="madebyollin/sdxl-vae-fp16-fix")
    dtype: Literal["fp32", "fp16", "bf16"] = doc("bf16", "dtype of the frozen UNet, text encoders and VAE (a VAE that "
                                                 "overflows in fp16 stays fp32); fp16 needs a GPU")

    @model_validator(mode="after")
    def _single_file_settings(self) -> ModelSection:
        """What a single-file checkpoint allows, refused while the config loads rather than when weights do."""
        if is_pickle_checkpoint(self.pretrained):
            raise ValueError(f"model.pretrained {self.pretrained!r} is a pickle checkpoint: loading one can run arbitrary "
                             "code, so waveft-train reads only safetensors; use the model's .safetensors release")
        single = is_single_file(self.pretrained)
        if self.config is not None and not single:
            raise ValueError("model.config is read only for a single-file model.pretrained (a .safetensors "
                             f"checkpoint); {self.pretrained!r} carries its own configs, so remove model.config")
        if single and self.revision is not None:
            raise ValueError("model.revision names a hub revision, but model.pretrained is a local .safetensors file, "
                             "which has none; remove model.revision")
        return self


class WaveFTSection(Section):
    """The adapter: every field of peft's WaveFTConfig, with peft's meaning and defaults (targets: SDXL attention)."""

    n_frequency: PositiveInt = doc(2592, "learnable wavelet coefficients per adapted layer (1 … d_out·d_in): the budget")
    scaling: float = doc(25.0, "multiplies ΔW, like LoRA's alpha; any number but 0")
    wavelet_family: str = doc("db1", f"{ALLOWED_FAMILIES_TEXT}; db1 is the fastest")
    use_idwt: bool = doc(True, "false: place the coefficients directly in ΔW (no inverse DWT)")
    random_loc_seed: int = doc(777, "seed of the coefficient locations (derived exactly as peft does; saved with "
                               "the adapter)")
    fan_in_fan_out: bool = doc(False, "true only for layers that store weights as (in, out)")
    target_modules: list[str] | str = doc(lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                          "module-name suffixes, or one regex matching whole module names")
    exclude_modules: list[str] | str | None = doc(None, "names or a regex of modules to leave out")
    bias: Literal["none", "all", "waveft_only"] = doc("none", "`none`, `all` (train every bias of the UNet), "
                                                      "`waveft_only` (train the biases of the adapted layers)")
    modules_to_save: list[str] | None = doc(None, "extra modules trained in full and saved with the adapter")
    layers_to_transform: int | list[int] | None = doc(None, "adapt only these layer indices (needs a list "
                                                      "target_modules; peft semantics)")
    layers_pattern: str | list[str] | None = doc(None, "name of the layer list that layers_to_transform indexes")
    n_frequency_pattern: dict[str, PositiveInt] = doc(lambda: {}, "per-layer n_frequency: regex keys matched against the "
                                                      "end of layer names, as in peft, e.g. `{attn2.to_k: 512}`; a key "
                                                      "that sets no adapted layer is an error")
    proportional_parameters: bool = doc(False, "split the total budget by d_in·d_out (at least 1 per layer)")
    init_weights: bool = doc(True, "true: start from zero (step 0 is the base model); false: small random values")
    text_encoders: bool = doc(False, "also put WaveFT on the attention linears (q/k/v/out_proj) of both CLIP text "
                              "encoders, with the settings above (docs/training.md#text-encoders)")
    text_encoder_n_frequency: PositiveInt | None = doc(None, "n_frequency of each text-encoder layer; null = n_frequency")

    @field_validator("wavelet_family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if not is_supported_family(value):
            raise ValueError(f"unknown wavelet family {value!r}; allowed: {ALLOWED_FAMILIES_TEXT}")
        return value

    @field_validator("scaling")
    @classmethod
    def _nonzero_scaling(cls, value: float) -> float:
        if value == 0:
            raise ValueError("0 would make the adapter do nothing (it multiplies ΔW); use any other number, "
                             "e.g. 25.0 (the default; negative values flip ΔW)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise ValueError("must name at least one module (a list of names, or one regex string)")
        return value

    @field_validator("target_modules", "exclude_modules", "layers_pattern", "n_frequency_pattern")
    @classmethod
    def _valid_regexes(cls, value: Any) -> Any:
        """peft reads a string here, and every pattern key, as a regular expression."""
        for pattern in [value] if isinstance(value, str) else value if isinstance(value, dict) else []:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return value

    @model_validator(mode="after")
    def _peft_cross_checks(self) -> WaveFTSection:
        """The same combinations peft refuses, caught before any model is loaded."""
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("waveft.layers_to_transform cannot be used when waveft.target_modules is a "
                             "regex string; give target_modules as a list")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("waveft.layers_pattern cannot be used when waveft.target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("waveft.layers_pattern needs waveft.layers_to_transform as well")
        if self.proportional_parameters and self.n_frequency_pattern:
            raise ValueError("waveft.n_frequency_pattern has no effect when waveft.proportional_parameters is true "
                             "(peft then sizes every layer by its d_in·d_out); use one or the other")
        return self

    def peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `peft.WaveFTConfig(**kwargs)`; "haar" becomes "db1" (same filter, peft's name)."""
        kwargs = self.model_dump(exclude=set(TEXT_ENCODER_FIELDS))
        if kwargs["wavelet_family"] == "haar":
            kwargs["wavelet_family"] = "db1"
        return kwargs


class DataSection(Section):
    """The subject photos and the prompt with the rare token."""

    instance_dir: str | None = doc(None, "the subject photos (3-10): a local folder (one of kohya-style `<repeats>_<prompt>` "
                                   "subfolders is read as concepts), or a hub dataset id; required unless `concepts` "
                                   "is given", example="./subject", min_length=1)
    instance_prompt: Prompt | None = doc(None, "rare token + class noun, e.g. `a photo of sks dog` (not blank); "
                                         "required with data.instance_dir", example="a photo of sks dog")
    caption_column: str | None = doc(None, "per-photo captions: a key of the folder's metadata.jsonl (`text` by "
                                     "convention), where a `.txt` file beside a photo (photo.txt for photo.jpg) counts "
                                     "too, or a hub dataset's column; null = instance_prompt for every photo")
    caption_dropout: UnitInterval = doc(0.0, "share of subject examples trained with no caption (the unconditional "
                                        "input guidance samples against), e.g. 0.1; drawn from train.seed and each "
                                        "example's place in the run")
    shuffle_tags: bool = doc(False, "tag-style captions (`sks dog, sitting, grass`): shuffle each example's "
                             "comma-separated tags, the first data.keep_tags staying in place")
    keep_tags: NonNegativeInt = doc(0, "leading tags that stay in place when data.shuffle_tags shuffles (1 keeps a "
                                    "trigger tag first)")
    resolution: Resolution = doc(1024, "training size in pixels (multiple of 8): the side of the square bucket; "
                                 "other buckets have about as many pixels")
    bucketing: bool = doc(True, "train each photo at the aspect-ratio bucket nearest its shape (SDXL's ~1 MP list "
                          "scaled to resolution) instead of a square crop")
    center_crop: bool = doc(False, "crop the centre instead of a random window")
    random_flip: bool = doc(True, "random horizontal flips (turn off for text or asymmetric subjects)")
    repeats: PositiveInt = doc(1, "each instance image appears this many times per epoch")
    dataloader_workers: NonNegativeInt = doc(0, "DataLoader worker processes that load images")

    @model_validator(mode="after")
    def _keep_tags_needs_shuffling(self) -> DataSection:
        if self.keep_tags and not self.shuffle_tags:
            raise ValueError(f"data.keep_tags is {self.keep_tags} but data.shuffle_tags is false, so no tag moves and "
                             "keep_tags would change nothing; set data.shuffle_tags: true, or data.keep_tags: 0")
        return self


class PriorSection(Section):
    """DreamBooth prior preservation: generated class images keep the class from collapsing onto the subject."""

    enabled: bool = doc(True, "train on class images too (DreamBooth prior preservation)")
    class_dir: str | None = doc(None, "class images folder, apart from data.instance_dir (required when enabled); "
                                "missing images are generated there and recorded in manifest.json",
                                example="./class_images")
    class_prompt: str | None = doc(None, "prompt of the class images (required when enabled)",
                                   example="a photo of dog")
    num_class_images: PositiveInt = doc(100, "class images used; missing ones are generated with the base model")
    loss_weight: PositiveFloat = doc(1.0, "weight of the class-image loss")
    generation_steps: PositiveInt = doc(25, "sampler steps per generated class image")
    generation_guidance: NonNegativeFloat = doc(5.0, "classifier-free guidance for class images")
    generation_batch_size: PositiveInt = doc(2, "class images generated at once")

    def missing_class_fields(self) -> list[str]:
        """What prior preservation lacks (TrainConfig checks it: with concepts, each concept may bring its own)."""
        blank = [key for key in ("class_dir", "class_prompt") if not (getattr(self, key) or "").strip()]
        missing = blank if self.enabled else []
        if not missing:
            return []
        names = " and ".join(f"prior.{key}" for key in missing)
        return [f"{names} {'is' if len(missing) == 1 else 'are'} required when prior.enabled is true (e.g. class_dir: "
                "./class_images, class_prompt: \"a photo of dog\"); set them, or set prior.enabled: false"]


class TrainSection(Section):
    """The optimization: steps, batch, optimizer, precision, checkpoints."""

    max_steps: PositiveInt = doc(500, "optimizer steps (raising it later extends a finished run; a decaying LR "
                                 "schedule is then stretched to the new total)")
    batch_size: PositiveInt = doc(1, "items per process per micro-step (an item is an instance image and, with prior "
                                  "preservation, its class image; each item is its own forward/backward pass)")
    gradient_accumulation: PositiveInt = doc(4, "micro-steps per optimizer step; the global batch is batch_size × "
                                             "processes × gradient_accumulation")
    learning_rate: PositiveFloat = doc(1e-4, "peak learning rate")
    lr_scheduler: LrScheduler = doc("constant", "diffusers' schedulers: constant, constant_with_warmup, linear, "
                                    "cosine, cosine_with_restarts, polynomial")
    lr_warmup_steps: NonNegativeInt = doc(0, "warmup steps (need a scheduler other than `constant`)")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = doc(
        "adamw", "`adamw`; `adamw8bit` (needs `pip install 'waveft-train[bnb]'`, CUDA only); `prodigy`, which finds "
        "its own step size (needs `pip install 'waveft-train[prodigy]'` and learning_rate: 1.0, docs/training.md)")
    adam_beta1: UnitInterval = doc(0.9, "AdamW β1 (first-moment decay); Prodigy's too")
    adam_beta2: UnitInterval = doc(0.999, "AdamW β2 (second-moment decay); Prodigy's too")
    adam_weight_decay: NonNegativeFloat = doc(1e-2, "AdamW weight decay (decoupled); Prodigy's too")
    adam_epsilon: PositiveFloat = doc(1e-8, "AdamW ε (numerical floor); Prodigy's too")
    prodigy_d_coef: PositiveFloat = doc(1.0, "Prodigy: multiplies its step-size estimate (below 1 is gentler)")
    prodigy_beta3: UnitInterval | None = doc(None, "Prodigy: decay of its step-size statistics; null = √adam_beta2")
    prodigy_use_bias_correction: bool = doc(True, "Prodigy: Adam's bias correction (recommended for diffusion)")
    prodigy_safeguard_warmup: bool = doc(True, "Prodigy: keeps its early estimate from overshooting (recommended)")
    text_encoder_lr: PositiveFloat | None = doc(None, "learning rate of the text encoders' adapters; null = learning_rate")
    text_encoder_stop_step: PositiveInt | None = doc(None, "train the text encoders only for the first N steps "
                                                     "(then they stay as they are); null = every step")
    ema_decay: UnitInterval | None = doc(None, "EMA of the trained weights, used for validation grids and the saved "
                                         "adapter, e.g. 0.999; null = off (docs/training.md)")
    max_grad_norm: PositiveFloat | None = doc(1.0, "gradient clipping; null = none")
    mixed_precision: Literal["no", "fp16", "bf16"] = doc("bf16", "accelerate autocast (the spectrum stays fp32); fp16 "
                                                         "needs a GPU (on the CPU fp32 weights then train in fp32 and "
                                                         "half-precision weights are refused)")
    gradient_checkpointing: bool = doc(True, "recompute activations in backward: much less memory, ~20 % slower")
    compile: bool = doc(False, "torch.compile the UNet for training steps (inductor), for GPUs: minutes of "
                        "compilation at the first step (and once more for a second bucket size), then fewer kernel "
                        "launches per step; validation and class images run eagerly (docs/memory.md#speed)")
    seed: NonNegativeInt = doc(42, "seeds data order, augmentation, noise and timesteps (a resumed run draws the same)")
    checkpoint_every: NonNegativeInt = doc(100, "steps between resumable checkpoints; 0 = only the final state")
    checkpoints_keep: PositiveInt | None = doc(3, "newest checkpoints kept; null = all (the final state is always "
                                               "written, so a rerun or a raised max_steps continues)")
    cache_latents: bool = doc(True, "VAE-encode each example once (its first-epoch crop and flip are then kept)")
    prediction_type: Literal["epsilon", "v_prediction"] | None = doc(None, "null = the scheduler's; `epsilon` or "
                                                                     "`v_prediction` (recorded with the adapter)")
    snr_gamma: PositiveFloat | None = doc(None, "Min-SNR-γ loss weighting (5.0 is common); null = plain MSE")
    noise_offset: NonNegativeFloat = doc(0.0, "offset noise, e.g. 0.0357")
    log_every: PositiveInt = doc(1, "steps between metrics.jsonl lines (the last step is always logged)")
    cpu_threads: PositiveInt | None = doc(None, "torch threads when training on the CPU; null = torch's default (every "
                                          "core). 1 keeps steps steady when another program competes for the cores")
    report_to: list[Tracker] = doc(
        "none", "trackers that also get the metrics and the validation grids: `none`, `tensorboard`, `wandb`, or a list "
        "such as `[tensorboard, wandb]` (`pip install 'waveft-train[tensorboard]'`, `'waveft-train[wandb]'`)",
        validate_default=True)
    tracker_project: str = doc("waveft-train", "the W&B project; TensorBoard writes to the folder of this name in "
                               "output.dir", min_length=1)
    tracker_run_name: str | None = doc(None, "the run's name in W&B; null = the name of output.dir's folder")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` as false; that is what the user meant."""
        return "no" if value is False else value

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        """One name or a list; `none` (or null) is no tracker. Unknown names get the list of known ones."""
        if value is None:
            return []
        names = [value] if isinstance(value, str) else value
        allowed = f"allowed: none, {', '.join(TRACKERS)}, or a list of them such as [tensorboard, wandb]"
        if not isinstance(names, list):
            raise ValueError(f"got {value!r}; {allowed}")
        unknown = [name for name in names if name not in (*TRACKERS, "none")]
        if unknown:
            raise ValueError(f"unknown tracker {', '.join(map(repr, unknown))}; {allowed}")
        return list(dict.fromkeys(name for name in names if name != "none"))

    @model_validator(mode="after")
    def _prodigy_learning_rate(self) -> TrainSection:
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            raise ValueError(f"train.learning_rate is {self.learning_rate} with train.optimizer: prodigy, which finds "
                             "the step size itself and multiplies it by learning_rate, so it would barely train; set "
                             "train.learning_rate: 1.0 (lower prodigy_d_coef to be gentler), or use optimizer: adamw")
        return self

    @model_validator(mode="after")
    def _warmup_needs_a_warmup_scheduler(self) -> TrainSection:
        if self.lr_warmup_steps > 0 and self.lr_scheduler not in WARMUP_SCHEDULERS:
            raise ValueError(f"train.lr_warmup_steps is {self.lr_warmup_steps} but train.lr_scheduler "
                             f"{self.lr_scheduler!r} has no warmup (the steps would be ignored); use a scheduler "
                             f"with warmup ({', '.join(WARMUP_SCHEDULERS)}), or set train.lr_warmup_steps: 0")
        return self


class ValidationSection(Section):
    """Sample grids during training: prompt rows × seed columns, the base model's images beside the adapter's."""

    prompts: list[Prompt] = doc(lambda: ["a photo of sks dog in a bucket", "a photo of sks dog on the beach"],
                                "one grid row per prompt (none blank)")
    every: NonNegativeInt = doc(100, "steps between grids; 0 = off (a final grid is always made when prompts are set)")
    num_images: PositiveInt = doc(4, "images per prompt; columns are seeds `seed`, `seed`+1, …")
    steps: PositiveInt = doc(25, "sampler steps")
    guidance: NonNegativeFloat = doc(5.0, "classifier-free guidance")
    seed: NonNegativeInt = doc(42, "seed of the first column")
    resolution: Resolution | None = doc(None, "null = data.resolution")
    evaluate: bool = doc(False, "also score the adapter at each validation step and at the end against the base model "
                         "(docs/evaluation.md; needs validation.every a multiple of train.checkpoint_every, and "
                         "prior.class_prompt): evaluation.jsonl, the best checkpoint in evaluation.json")
    # facebook/dino-vits16 keeps its safetensors conversion in the branch refs/pr/1 (main holds only a pickle)
    dino_model: str = doc("facebook/dino-vits16@refs/pr/1", "DINO ViT of the scores: a hub id with an optional "
                          "@revision, a local folder (model.safetensors), or `tiny` (random, for tests)", min_length=1)
    clip_model: str = doc("openai/clip-vit-large-patch14", "CLIP of the scores (CLIP-I, CLIP-T), named like dino_model",
                          min_length=1)


class OutputSection(Section):
    """Where the run writes."""

    dir: str = doc("outputs/run", "everything goes here (rerunning resumes from it); apart from data.instance_dir and "
                   "prior.class_dir", min_length=1)


class TrainConfig(BaseModel):
    """The whole run. A missing or empty section means "all defaults" and is validated like any other."""

    model_config = ConfigDict(extra="forbid")
    model: ModelSection
    waveft: WaveFTSection
    concepts: list[ConceptSection] = doc(lambda: [], "several subjects in one run, instead of data.instance_dir "
                                         "(docs/data.md#several-concepts); data and prior hold what they share")
    data: DataSection
    prior: PriorSection
    train: TrainSection
    validation: ValidationSection
    output: OutputSection

    @model_validator(mode="before")
    @classmethod
    def _absent_sections_are_empty(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        filled = dict(data)
        for name in cls.model_fields:
            if filled.get(name) is None:
                filled[name] = [] if name == "concepts" else {}
        return filled

    @model_validator(mode="after")
    def _one_way_to_name_the_photos(self) -> TrainConfig:
        problems = concept_problems(self)
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    @model_validator(mode="after")
    def _fp16_needs_loss_scaling(self) -> TrainConfig:
        if self.model.dtype == "fp16" and self.train.mixed_precision == "no":
            raise ValueError("model.dtype: fp16 with train.mixed_precision: no would train without loss scaling "
                             "(small gradients vanish); set train.mixed_precision: fp16 (or bf16), or model.dtype: bf16")
        return self

    @model_validator(mode="after")
    def _scoring_has_what_it_reads(self) -> TrainConfig:
        """validation.evaluate names each scored step's checkpoint (`--checkpoint best` loads it) and measures class
        drift with prior.class_prompt."""
        every, checkpoint_every = self.validation.every, self.train.checkpoint_every
        if self.validation.evaluate and every and (not checkpoint_every or every % checkpoint_every):
            raise ValueError(f"validation.evaluate names the checkpoint of each scored step, so validation.every "
                             f"({every}) must be a multiple of train.checkpoint_every ({checkpoint_every}); set both "
                             f"to {every}, or validation.every: 0 to score only the final adapter")
        if self.validation.evaluate and not (self.prior.class_prompt or "").strip():
            raise ValueError("validation.evaluate measures how far the class drifts toward the subject with "
                             "prior.class_prompt, which is empty; set it (e.g. \"a photo of dog\"; it is read even when "
                             "prior.enabled is false), or set validation.evaluate: false")
        return self

    text_encoder_settings = model_validator(mode="after")(check_text_encoder_settings)

    def validation_resolution(self) -> int:
        return self.validation.resolution or self.data.resolution


SECTIONS: tuple[str, ...] = tuple(TrainConfig.model_fields)

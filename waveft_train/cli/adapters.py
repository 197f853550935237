"""`waveft-train sample` and `export`: use a saved adapter folder (or a run's checkpoint) without a training config.

cli/main.py registers them as Typer commands; their docstrings are the commands' help text. `evaluate` is in
cli/evaluate.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import typer

from waveft_train.common.errors import UserError
from waveft_train.common.files import make_folder, save_png_atomically, writing

COMPARE_GROUP_GAP = 16  # white pixels between the base model's images and the adapter's in --compare-base grids
SAMPLE_DTYPES = ("auto", "fp16", "bf16", "fp32")

AdapterOption = typer.Option(
    None,
    "--adapter",
    "-a",
    help="Adapter folder (adapter_config.json + adapter_model.safetensors), e.g. outputs/dog/adapter. Or use --run.",
    show_default=False,
)
RunOption = typer.Option(None, "--run", help="A run's output folder (output.dir): use its adapter named by "
                         "--checkpoint instead of --adapter.", show_default=False)
CheckpointOption = typer.Option(
    None, "--checkpoint", help="With --run: best (the checkpoint `waveft-train evaluate --run` named best), final (the "
    "run's adapter/, the default) or a step number such as 400.", show_default=False)
BaseOption = typer.Option(
    None,
    "--base",
    help="Base model: `tiny`, `toy`, a hub id, a local diffusers folder or a single-file checkpoint (.safetensors). "
    "Default: the one the adapter was trained on (a single file is checked against its recorded sha256).",
    show_default=False,
)
BaseConfigOption = typer.Option(
    None,
    "--base-config",
    help="For a single-file base: where its configs and tokenizers come from (a hub id or local diffusers folder), "
    "as model.config. Default: what the adapter recorded.",
    show_default=False,
)


def chosen_adapter(adapter: Path | None, run: Path | None, checkpoint: str | None) -> Path:
    """The adapter folder of --adapter, or of --run with --checkpoint (best, final or a step)."""
    from waveft_train.train.scoring import run_adapter

    if adapter is not None and (run is not None or checkpoint is not None):
        raise UserError("--adapter names the adapter folder itself; --run with --checkpoint picks one of a run's "
                        "adapters. Pass one or the other, e.g. --run outputs/dog --checkpoint best.")
    if adapter is not None:
        return adapter
    if run is None:
        raise UserError("--checkpoint picks an adapter of a run: pass the run's folder too, e.g. --run outputs/dog "
                        "--checkpoint best." if checkpoint is not None else "Which adapter? Pass --adapter "
                        "outputs/dog/adapter, or --run outputs/dog --checkpoint best.")
    return run_adapter(run, checkpoint or "final")


def sample(
    adapter: Path | None = AdapterOption,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the grid (.png)."),
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="A prompt (one grid row). Repeatable."),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", help="Text file with one prompt per line (blank lines and # comments skipped)."
    ),
    num_images: int = typer.Option(4, "--num-images", "-n", min=1, help="Images per prompt (grid columns)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first column; column i uses seed + i."),
    steps: int = typer.Option(25, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(5.0, "--guidance", help="Classifier-free guidance scale."),
    height: int | None = typer.Option(
        None, "--height", min=8, help="Image height, a multiple of 8. Default: the model's (1024 for SDXL).",
        show_default=False,
    ),
    width: int | None = typer.Option(
        None, "--width", min=8, help="Image width, a multiple of 8. Default: the model's (1024 for SDXL).",
        show_default=False,
    ),
    scale: float = typer.Option(1.0, "--scale", help="Adapter strength: 0 = base model, 1 = as trained."),
    compare_base: bool = typer.Option(
        False, "--compare-base/--no-compare-base", help="Put the base model's images for the same seeds left of the "
        "adapter's."
    ),
    base: str | None = BaseOption,
    base_config: str | None = BaseConfigOption,
    device: str | None = typer.Option(
        None, "--device", help="torch device: cpu, cuda, cuda:N or mps. Default: cuda if available, else cpu.",
        show_default=False,
    ),
    dtype: str = typer.Option("auto", "--dtype", help="UNet/text encoder precision: auto (fp16 on GPU, fp32 on CPU), "
                              "fp16, bf16 or fp32."),
    run: Path | None = RunOption,
    checkpoint: str | None = CheckpointOption,
) -> None:
    """Make an image grid from a saved adapter: one row per prompt, one column per seed.

    With --compare-base each row holds the base model's N images, a 16-pixel white gap, then the adapter's N
    images for the same seeds. The same seed gives the same starting noise on every device.
    """
    from waveft_train.adapter.load import adapters_disabled, load_adapter_unet
    from waveft_train.adapter.sampling import NonFiniteImage, default_image_size, generate_grid_images, make_grid
    from waveft_train.data.encode import warn_about_long_prompts
    from waveft_train.models.loading import build_pipeline

    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end with .png (the grid is written as a PNG image).")
    prompts = list(prompt or []) + (_read_prompts(prompts_file) if prompts_file is not None else [])
    if not prompts:
        raise UserError("No prompt given. Pass --prompt \"a photo of sks dog\" (repeatable) or --prompts-file FILE.")
    if any(not text.strip() for text in prompt or []):
        raise UserError("--prompt \"\" is blank: an empty prompt makes an unconditioned image, not the subject. Give "
                        "the text, e.g. --prompt \"a photo of sks dog\".")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and value % 8:
            raise UserError(f"{name} {value} is not a multiple of 8, as SDXL requires; e.g. use {value - value % 8}.")
    for name, value, example in (("--scale", scale, "1.0"), ("--guidance", guidance, "5.0")):
        if not math.isfinite(value):
            raise UserError(f"{name} {value} is not a finite number; give a real number, e.g. {name} {example}.")
    adapter = chosen_adapter(adapter, run, checkpoint)
    run_device = _run_device(device)
    weight_dtype = _sample_dtype(dtype, run_device)
    make_folder(out.absolute().parent, "The folder of --out")  # before minutes of sampling, not after

    components, unet = load_adapter_unet(adapter, base, scale=scale, dtype=weight_dtype, base_config=base_config)
    pipeline = build_pipeline(components, unet)
    pipeline.to(run_device)
    warn_about_long_prompts([("--prompt", text) for text in prompts], pipeline.tokenizer)
    size = default_image_size(pipeline)
    seeds = list(range(seed, seed + num_images))
    options = {"steps": steps, "guidance": guidance, "height": height or size, "width": width or size}
    try:
        rows = generate_grid_images(pipeline, prompts, seeds, **options)
        if compare_base:
            with adapters_disabled(unet, pipeline.text_encoder, pipeline.text_encoder_2):
                base_rows = generate_grid_images(pipeline, prompts, seeds, **options)
    except NonFiniteImage as error:
        raise UserError(
            f"Sampling gave no image: {error}, so the grid would be black. The adapter at --scale {scale:g} (with "
            f"--guidance {guidance:g}) drives the model out of range; use a --scale between 0 and about 2 (1 = as "
            "trained). If --scale 1 fails too, the adapter itself is broken (a diverged run)."
        ) from None
    if compare_base:
        rows = [base_row + adapter_row for base_row, adapter_row in zip(base_rows, rows)]
        grid = make_grid(rows, group_size=num_images, group_gap=COMPARE_GROUP_GAP)
    else:
        grid = make_grid(rows)
    with writing(out, "the sample grid"):
        save_png_atomically(grid, out)
    layout = " (base | adapter)" if compare_base else ""
    typer.echo(f"Wrote {out}: {len(prompts)} prompt(s) x seeds {seeds[0]}..{seeds[-1]}{layout}.")


def export(
    adapter: Path | None = AdapterOption,
    out: Path = typer.Option(
        ..., "--out", "-o", help="Where to write: a folder (--format diffusers) or a .safetensors file (comfyui, lora)."
    ),
    format: str = typer.Option(
        "diffusers", "--format", "-f", help="diffusers: the merged UNet folder. comfyui: one file of full updates "
        "(.diff) for ComfyUI, A1111/Forge and LyCORIS, exact. lora: one kohya LoRA file made by SVD (lossy; needs "
        "--rank and/or --max-error). waveft: one small exact file (the spectra) for ComfyUI with the WaveFT node "
        "(integrations/comfyui) and for waveft_train.load_adapter."
    ),
    rank: int | None = typer.Option(None, "--rank", help="--format lora: the rank of every layer (with "
                                       "--max-error: the largest rank used).", show_default=False),
    max_error: float | None = typer.Option(None, "--max-error", help="--format lora: per layer, the smallest rank "
                                              "whose relative Frobenius error is at most this (e.g. 0.05).",
                                              show_default=False),
    naming: str | None = typer.Option(None, "--naming", help="comfyui/lora: module names, diffusers (default; read "
                                         "by ComfyUI, A1111/Forge, LyCORIS) or ldm (kohya's SDXL spelling).",
                                         show_default=False),
    base: str | None = BaseOption,
    base_config: str | None = BaseConfigOption,
    dtype: str = typer.Option("fp16", "--dtype", help="Precision of the saved weights: fp16, bf16 or fp32."),
    force: bool = typer.Option(
        False, "--force/--no-force", help="Replace an earlier export at --out (anything else is never replaced)."
    ),
    run: Path | None = RunOption,
    checkpoint: str | None = CheckpointOption,
) -> None:
    """Export an adapter without peft: a merged diffusers UNet (default), or one .safetensors file for ComfyUI,
    A1111/Forge and LyCORIS (--format comfyui), as a compact kohya LoRA (--format lora), or as the small exact WaveFT
    file that ComfyUI reads with the WaveFT node (--format waveft).

    The merged UNet loads with UNet2DConditionModel.from_pretrained(OUT). Put a comfyui/lora file in ComfyUI's
    models/loras/ or A1111/Forge's models/Lora/.
    """
    from waveft_train.adapter.export import export as export_adapter

    adapter = chosen_adapter(adapter, run, checkpoint)
    result = export_adapter(adapter, out, format=format, base=base, dtype=dtype, naming=naming, rank=rank,
                            max_error=max_error, force=force, base_config=base_config)
    if format == "diffusers":
        typer.echo(f"Wrote the merged UNet to {result.path}.")
        return
    if result.errors:
        typer.echo(f"{'layer':<96} {'rank':>5} {'rel. error':>10}")
        for key, error in result.errors.items():
            typer.echo(f"{key:<96} {result.ranks[key]:>5} {error:>10.4f}")
        worst_key, worst_error = result.worst
        typer.echo(f"Worst relative Frobenius error: {worst_error:.4f} ({worst_key}); all errors are in the file's "
                   "metadata (waveft.lora_errors).")
    typer.echo(f"Wrote {result.path}: {result.layers} layers, --format {format}.")


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"The prompts file {path} does not exist (or is not a file); write one prompt per line.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"Cannot read the prompts file {path} as UTF-8 text ({error}).") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        what = "is empty" if not lines else f"has only blank lines and # comments ({len(lines)} line(s))"
        raise UserError(
            f"The prompts file {path} {what}, so it gives no prompts; write one prompt per line (lines starting "
            "with # are comments), or pass --prompt \"a photo of sks dog\"."
        )
    return prompts


DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")
ALLOWED_DEVICES = "cpu, cuda, cuda:N (N = GPU index, e.g. cuda:1) or mps"


def _run_device(device: str | None) -> str:
    """The torch device `sample` runs on: checked before any model is loaded."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = device.strip().lower()
    if not DEVICE_PATTERN.fullmatch(name):
        raise UserError(f"--device '{device}' is not a device waveft-train can sample on; allowed: {ALLOWED_DEVICES}.")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but torch sees no CUDA GPU here; use --device cpu.")
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise UserError(
                f"--device {name} was asked for, but torch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})."
            )
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but torch has no usable Apple GPU (MPS) here; use --device cpu.")
    return name


def _sample_dtype(name: str, device: str):
    import torch

    from waveft_train.models.loading import DTYPES

    if name not in SAMPLE_DTYPES:
        raise UserError(f"Unknown --dtype '{name}'; allowed: {', '.join(SAMPLE_DTYPES)}.")
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]

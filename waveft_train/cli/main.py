"""The `waveft-train` command line (Typer).

`waveft-train --config FILE` trains (also `python -m waveft_train` and `accelerate launch -m waveft_train`);
`params`, `init`, `report`, `sample`, `export` and `evaluate` (scores an adapter, or ranks a run's checkpoints)
are subcommands. A `UserError` anywhere becomes one readable paragraph and exit status 2; `--debug` shows the full
traceback instead.
"""

from __future__ import annotations

import errno
import inspect
import sys
from pathlib import Path

import typer

from waveft_train.common.errors import RunInterrupted, UserError


def paragraphs(text: str | None) -> str:
    """A docstring as help text: each paragraph one line, so the terminal wraps it (not the source's line breaks)."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text or "").split("\n\n"))


app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=paragraphs("""Personalize Stable Diffusion XL with WaveFT (wavelet fine-tuning) and DreamBooth prior
    preservation.

    Train: waveft-train train --config subject.yaml [--set train.max_steps=800] (`train` may be left out). New here?
    waveft-train init writes a documented starter config; waveft-train train --config configs/demo.yaml runs the
    demo."""),
)

ConfigOption = typer.Option(None, "--config", "-c", help="Training config (YAML).", show_default=False)
SetOption = typer.Option(
    None, "--set", help="Override a config value: section.key=value (value parsed as YAML). Repeatable."
)
ForceOption = typer.Option(False, "--force/--no-force", help="Train into an output folder that holds a different run.")
DebugOption = typer.Option(False, "--debug/--no-debug", help="Show full tracebacks for errors.")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"waveft-train {version('waveft-train')}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    force: bool = ForceOption,
    debug: bool = DebugOption,
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version."),
) -> None:
    ctx.obj = {"debug": debug}
    if ctx.invoked_subcommand is None:
        _train(config, overrides, force)
    elif config is not None or overrides or force:
        raise UserError(f"--config, --set and --force go after the command: waveft-train {ctx.invoked_subcommand} "
                        "--config FILE ...")


@app.command("train", help=paragraphs("""Train (or resume) a WaveFT adapter: waveft-train train --config subject.yaml
    [--set train.max_steps=800]. Running the same command again on the same output.dir resumes from its newest
    checkpoint."""))
def train(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    force: bool = ForceOption,
    debug: bool = DebugOption,  # read by main() before parsing; accepted here too
) -> None:
    _train(config, overrides, force)


def _train(config: Path | None, overrides: list[str] | None, force: bool) -> None:
    if config is None:
        raise UserError("No config given. Run `waveft-train train --config configs/demo.yaml`, or `waveft-train init` "
                        "to write a documented starter config; `waveft-train --help` lists every command.")
    from waveft_train.config import load_config
    from waveft_train.train.run import train_from_config

    train_from_config(load_config(config, overrides or ()), force=force)


@app.command(help=paragraphs("""Show per-layer n_frequency, trainable parameters, the LoRA rank with the same budget
    and the GPU memory the run needs (an estimate), without loading weights."""))
def params(
    config: Path = typer.Option(..., "--config", "-c", help="Training config (YAML)."),
    overrides: list[str] | None = SetOption,
) -> None:
    from waveft_train.config import load_config
    from waveft_train.config.concepts import validation_with_concepts
    from waveft_train.train.params import describe_memory, describe_parameters
    from waveft_train.train.preflight import adapter_on_meta_unet, text_encoders_on_meta

    loaded = load_config(config, overrides or ())
    unet = adapter_on_meta_unet(loaded.model, loaded.waveft)
    typer.echo(describe_parameters(loaded.model, loaded.waveft, unet))
    typer.echo("")
    encoders = text_encoders_on_meta(loaded.model, loaded.waveft) if loaded.waveft.text_encoders else None
    validation = validation_with_concepts(loaded)  # concepts' grid rows are validation sampling too
    typer.echo(describe_memory(loaded.model, loaded.data, loaded.prior, loaded.train, validation, unet, encoders))


@app.command()
def init(
    path: Path = typer.Argument(Path("waveft.yaml"), help="Where to write the starter config."),
    force: bool = typer.Option(False, "--force/--no-force", help="Overwrite an existing file."),
) -> None:
    """Write a documented starter config."""
    from waveft_train.common.files import atomic_write_text, make_folder
    from waveft_train.config.docs import starter_config_text

    if path.is_dir():
        raise UserError(f"{path} is a folder; give the path of the config file to write, e.g. {path / 'waveft.yaml'}.")
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it or choose another path.")
    make_folder(path.parent.absolute(), "The config's folder")
    try:
        atomic_write_text(path.resolve(), starter_config_text())  # through a symlink, as a plain write would
    except OSError as error:
        raise UserError(f"Cannot write {path}: {error.strerror or error}. Choose a path you can write to.") from None
    typer.echo(f"Wrote {path}. Edit data.instance_dir and the prompts, then: waveft-train --config {path}")


@app.command(help=paragraphs("""Rebuild a run's report.html from its files (metrics.jsonl, samples/, config.yaml,
    summary.json, evaluation.jsonl): for a run from before reports, after installing matplotlib, or after scoring its
    checkpoints."""))
def report(
    output_dir: Path = typer.Argument(..., help="A run's output folder (its output.dir).", show_default=False),
) -> None:
    from waveft_train.train.report_html import write_report

    typer.echo(f"Wrote {write_report(output_dir)}")


def _register_adapter_commands() -> None:
    from waveft_train.cli.adapters import export, sample
    from waveft_train.cli.evaluate import evaluate

    for command in (sample, export, evaluate):
        app.command(help=paragraphs(command.__doc__))(command)


def _configure_logging(debug: bool) -> None:
    """Our own INFO lines (e.g. how many class images get generated); libraries stay at their warnings."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is at the time (it may be replaced after start-up)."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

    logger = logging.getLogger("waveft_train")
    if not any(isinstance(handler, logging.StreamHandler) for handler in logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    # diffusers' pipeline module imports CLIP's image processor, which SDXL never uses; without torchvision
    # transformers announces a fallback on every run. It is not actionable, so it is not shown.
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage()
    )
    # A prompt past CLIP's 77 tokens: the pipelines and the tokenizer each print the dropped text (four times for
    # SDXL's two encoders); waveft-train says it once, short (data/encode.py's warn_about_long_prompts).
    logging.getLogger("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl").addFilter(
        lambda record: not record.getMessage().startswith("The following part of your input was truncated")
    )
    logging.getLogger("transformers.tokenization_utils_base").addFilter(
        lambda record: "Token indices sequence length is longer than" not in record.getMessage()
    )
    # diffusers logs a model folder's missing file, then raises it; our error names it once, with what to do.
    logging.getLogger("diffusers.models.modeling_utils").addFilter(
        lambda record: not record.getMessage().startswith("An error occurred while trying to fetch")
    )
    # diffusers still passes this deprecated argument to huggingface_hub on every config download; it changes
    # nothing and would print above our own error when a model id is wrong.
    import warnings

    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)


# Errors of the file system that a user fixes (space, permissions, a path that is a file where a folder must be).
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR,
               errno.EISDIR}


def _is_click_exception(error: BaseException, name: str) -> bool:
    """Whether `error` is click's `name` exception (UsageError, ClickException, Exit), from click itself or from
    the copy of click that typer ≥ 0.29 bundles (typer._click), whose classes are different objects."""
    return any(cls.__name__ == name for cls in type(error).__mro__)


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning user mistakes into exit status 2 without a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _configure_logging(debug)
    _register_adapter_commands()
    try:
        code = app(args=args, standalone_mode=False)  # Ctrl-C comes back as 130 (typer turns it into Exit(130))
    except RunInterrupted as error:  # a signal ended a run at a step boundary: not an error, but not done either
        typer.echo(str(error), err=True)
        sys.exit(error.exit_code)
    except UserError as error:
        if debug:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except OSError as error:
        if debug or error.errno not in USER_ERRNOS:
            raise
        where = f" on {error.filename}" if error.filename else ""
        typer.echo(f"error: the file system refused an operation{where}: {error.strerror}. Free some space, fix the "
                   "permissions or choose another path, then rerun the same command (a training run resumes from its "
                   "newest complete checkpoint).", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as error:
        if _is_click_exception(error, "ClickException"):  # usage errors: unknown command or option, bad value
            error.show()
            sys.exit(2)
        if _is_click_exception(error, "Exit"):
            sys.exit(error.exit_code)
        if _is_out_of_memory(error) and not debug:
            typer.echo(f"error: the GPU ran out of memory ({str(error).splitlines()[0]}). Lower the memory a step "
                       "needs: train.gradient_checkpointing: true, train.batch_size: 1 (raise "
                       "train.gradient_accumulation instead), train.cache_latents: true, model.dtype: bf16, a smaller "
                       "validation.resolution or data.resolution; then rerun the same command to resume.", err=True)
            sys.exit(2)
        raise
    if code == 130:
        typer.echo("Aborted (Ctrl-C). Every file is written atomically, so nothing was left half-written; a training "
                   "run resumes from its newest checkpoint when the same command runs again.", err=True)
    if isinstance(code, int) and code != 0:
        sys.exit(code)

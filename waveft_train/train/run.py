"""One training run, in the style of torchtune's recipes: the only module that sees the whole config.

`DreamBoothRun` builds each piece from its own config section and hands each stage exactly what it uses; what it
trains (WaveFT by default) is its one extension point, a `TrainingMethod` (train/methods.py):
`preflight()` (checks that need no weights; a finished run stops here), `setup()` (accelerate, models, class
images, data, conditioning, adapter, optimizer, resume), `train()` (the loop, with checkpoints and validation
grids between steps), `save_checkpoint()`, `validate()`, `finish()` (final adapter and summary.json), `cleanup()`.

Collective calls. Under `accelerate launch` every process runs this same code. The methods marked *collective*
contain barriers (`wait_for_everyone`) or reductions, so every process must reach them at the same point, which
`train()` guarantees by deciding what happens after a step from the step number alone. Only the main process writes
files; the others wait at the barrier after each write.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter
from contextlib import closing
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from waveft_train.adapter.files import load_adapter_weights_into
from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_write_text, make_folder, writing
from waveft_train.common.lock import FolderLock
from waveft_train.config import TrainConfig, config_fingerprint, dump_config
from waveft_train.config.concepts import validation_with_concepts
from waveft_train.data import concepts as concept_data
from waveft_train.data.caption_variation import CaptionVariation
from waveft_train.data.dataset import StepBatchSampler, collate
from waveft_train.data.encode import Conditioning, warn_about_long_prompts
from waveft_train.data.images import warn_about_small_images
from waveft_train.models.loading import DTYPES, load_components
from waveft_train.train import checkpoint
from waveft_train.train.checkpoint import finished_step
from waveft_train.train.ema import WeightAverage
from waveft_train.train.finish import invocation_record, run_summary, write_final
from waveft_train.train.launch import check_shared_folders, make_accelerator
from waveft_train.train.loop import LoopSettings, training_steps
from waveft_train.train.methods import TrainingMethod, WaveFT
from waveft_train.train.metrics import peak_memory_bytes
from waveft_train.train.model_card import model_card, stock_peft_caveats
from waveft_train.train.optim import make_lr_scheduler, make_optimizer, trainable_parameters_in_float32
from waveft_train.train.preflight import (
    adapter_on_meta_unet,
    check_optional_dependencies,
    check_vae,
    checkpoint_is_another_run,
    clear_previous_run,
    holds_other_run,
    validate_inputs,
)
from waveft_train.train.reporting import RunReport
from waveft_train.train.scoring import ValidationScores
from waveft_train.train.stopping import GracefulStop
from waveft_train.train.text_encoders import TextEncoderTraining
from waveft_train.train.validation import ValidationGrids

logger = logging.getLogger(__name__)


def train_from_config(config: TrainConfig, *, force: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run `config` describes; returns the output folder."""
    return DreamBoothRun(config, force=force, progress=progress).run()


class DreamBoothRun:
    def __init__(self, config: TrainConfig, *, force: bool = False, progress: bool = True,
                 method: TrainingMethod | None = None):
        """`method`: what the run trains (train/methods.py); default WaveFT with `config.waveft`."""
        self.config, self.force, self.progress = config, force, progress
        self.method = method if method is not None else WaveFT(config.waveft)
        self.output_dir = Path(config.output.dir)
        self.fingerprint = config_fingerprint(config)
        self.started, self.started_at = time.perf_counter(), time.time()
        self.invocations: list[dict] = []  # earlier invocations of this run, from the checkpoint it resumes
        self.step = 0
        self.step_seconds: list[float] = []
        self.final_loss: float | None = None
        self.last_words: list[str] = []  # what the main process prints once the run has ended
        self.grids = ValidationGrids(validation_with_concepts(config), config.validation_resolution(),
                                     self.output_dir / "samples", progress=progress)
        self.scores = ValidationScores(config.validation, config.data, config.prior, config.train,
                                       self.output_dir) if config.validation.evaluate else None
        self.lock = None
        self.is_main = int(os.environ.get("RANK", "0")) == 0  # before accelerate starts: the launcher's global rank
        train = config.train  # the run's global batch: what a resumed run (on any layout) must keep
        self.global_batch = train.batch_size * train.gradient_accumulation * int(os.environ.get("WORLD_SIZE", "1"))

    def run(self) -> Path:
        with GracefulStop(self.output_dir) as self.stop:
            if self.preflight():
                return self.output_dir
            try:
                self.setup()
                self.train()
                self.finish()
                self.cleanup()
            finally:
                if self.lock is not None:
                    self.lock.release()
        return self.output_dir

    # ------------------------------------------------------------------------------------------ setup
    def preflight(self) -> bool:
        """Every check that needs no weights; True when the output folder already holds this finished run."""
        config = self.config
        self.replace_other_run = holds_other_run(self.output_dir, self.fingerprint, force=self.force)
        finished_at = None if self.replace_other_run else finished_step(self.output_dir, config.train.max_steps)
        if finished_at is not None:
            if self.is_main:  # config.yaml stays as the finished run wrote it
                print(f"{self.output_dir} already holds the finished run ({finished_at} steps); nothing to do. Raise "
                      "train.max_steps to train further.", flush=True)
            return True
        validate_inputs(config.data, config.prior)
        check_optional_dependencies(config.train)
        adapter_on_meta_unet(config.model, config.waveft)  # target_modules, n_frequency against the architecture
        check_vae(config.model)
        self.concepts = concept_data.load_concepts(config.concepts, config.data, config.prior, report=self.is_main)
        for concept in self.concepts if self.is_main else []:
            warn_about_small_images(concept.images, config.data.resolution, concept.name)
        self.image_manifest = concept_data.concepts_manifest(self.concepts)
        if not self.replace_other_run:
            self.replace_other_run = checkpoint_is_another_run(self.output_dir, self.image_manifest, self.global_batch,
                                                               config.train, config.model, force=self.force)
        return False

    def setup(self) -> None:
        """Collective. Load and build everything; only then touch the output folder (resume or take it over)."""
        config = self.config
        self.accelerator = make_accelerator(config.train, config.model, self.output_dir)
        if self.accelerator.device.type == "cpu" and config.train.cpu_threads:
            torch.set_num_threads(config.train.cpu_threads)
        # Made (empty, if new) once the cheap checks have passed and before the models load: a path that cannot be a
        # folder fails in seconds, and a refused run leaves no stray folders.
        make_folder(self.output_dir, "output.dir")
        if self.accelerator.is_main_process:  # one writer per output folder; the other processes never write there
            self.lock = FolderLock(self.output_dir, what="training run")
            self.lock.acquire()
        folders = {"output.dir": self.output_dir, **concept_data.class_folders(self.concepts, config.prior)}
        for key, folder in folders.items():  # output.dir again changes nothing
            make_folder(folder, key)
        # Collective. The main process writes checkpoints every process resumes from, and each process writes its
        # share of class images: several processes (or machines) need both folders on storage they all see.
        check_shared_folders(self.accelerator, folders)
        if self.accelerator.is_main_process and self.method.saves_adapter:
            for caveat in stock_peft_caveats(config.waveft):
                logger.warning(caveat[0].upper() + caveat[1:])
        torch.manual_seed(config.train.seed)
        self.components = load_components(config.model.pretrained, revision=config.model.revision, vae=config.model.vae,
                                          weight_dtype=DTYPES[config.model.dtype], config=config.model.config)
        self.prediction_type = config.train.prediction_type or self.components.scheduler.config.get(
            "prediction_type", "epsilon")
        if self.accelerator.is_main_process:
            warn_about_long_prompts([*concept_data.prompts_by_source(self.concepts, with_class=config.prior.enabled),
                                     *(("validation.prompts", text) for text in self.grids.settings.prompts)],
                                    self.components.tokenizer)
        self._setup_data()
        self._setup_adapter()
        # Only now, with everything loaded and built, is anything in the output folder touched (up front it was only
        # made, if missing): a run that fails before this point leaves the previous run (even one being replaced with
        # --force) as it was, and no config.yaml behind.
        if self.accelerator.is_main_process and self.replace_other_run:
            clear_previous_run(self.output_dir)
        self.accelerator.wait_for_everyone()
        self.start_step = self.step = self._resume()
        if self.accelerator.is_main_process:
            with writing(self.output_dir / "config.yaml", "the run's resolved config"):
                atomic_write_text(self.output_dir / "config.yaml", dump_config(config))
            self.report = RunReport(self.output_dir, self.start_step, config.train, self.accelerator,
                                    settings=config.model_dump(mode="json"))
        self.accelerator.wait_for_everyone()

    def _setup_data(self) -> None:
        """Class images (generated where missing), the DreamBooth pairing, and the conditioning that owns caches."""
        data, prior, main = self.config.data, self.config.prior, self.accelerator.is_main_process
        class_images = None
        if prior.enabled:  # collective: every process generates its share of the missing class images
            class_images = concept_data.class_images_for_concepts(self.concepts, prior, self.config.model, self.components,
                                                     resolution=data.resolution, seed=self.config.train.seed,
                                                     accelerator=self.accelerator, progress=self.progress)
        self.dataset = concept_data.concepts_dataset(self.concepts, class_images, resolution=data.resolution,
                                        seed=self.config.train.seed, center_crop=data.center_crop,
                                        random_flip=data.random_flip, bucketing=data.bucketing)
        self.conditioning = Conditioning(self.components, self.dataset, device=self.accelerator.device,
                                         cache_latents=self.config.train.cache_latents, progress=self.progress and main,
                                         captions=CaptionVariation.of(data, self.config.train.seed),
                                         encode_live=self.config.waveft.text_encoders)

    def _setup_adapter(self) -> None:
        """The trainable parameters (the method's on the UNet, any text encoders'), optimizer, LR schedule."""
        train = self.config.train
        unet = self.components.unet.to(self.accelerator.device)
        self.method.attach(unet)
        if train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.trainable = trainable_parameters_in_float32(unet)
        self.text_encoders = TextEncoderTraining(self.components, self.config.waveft, train, self.accelerator.device)
        optimizer = make_optimizer(train, self.text_encoders.param_groups(self.trainable))
        self.trainable = self.trainable + self.text_encoders.parameters
        self.ema = WeightAverage(train.ema_decay, self.trainable)  # off (no-ops) unless train.ema_decay is set
        self.lr_scheduler = make_lr_scheduler(train, optimizer)
        with warnings.catch_warnings():
            # torch ≥ 2.13 deprecates DDP's broadcast_buffers, which accelerate's handler still passes; its replacement
            # differs only in a one-time sync at start, and our buffers are equal on every process anyway.
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.bare_unet = unet  # without the DDP or compile wrapper: what is saved, loaded and sampled
        if train.compile:  # training steps only: validation samples through the bare, eager UNet
            if self.accelerator.device.type == "cpu" and self.accelerator.is_main_process:
                logger.warning("train.compile on the CPU compiles for minutes and makes no step faster (BENCHMARKS.md "
                               "§6a); it is meant for GPUs.")
            self.unet = torch.compile(self.unet)

    def _resume(self) -> int:
        """Load the newest checkpoint that loads (damaged ones are named and skipped); the step to continue from."""
        if not self.method.saves_adapter:  # it writes no checkpoints either
            return 0
        for folder in checkpoint.newest_checkpoints(self.output_dir):
            try:
                adapter, state = checkpoint.load_checkpoint(folder)
            except UserError as error:
                logger.warning("Skipping the damaged checkpoint %s: %s", folder, error)
                continue
            return self._continue_from(folder, adapter, state)
        return 0

    def _continue_from(self, folder: Path, adapter: dict, state: dict) -> int:
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"The checkpoint {folder} was written by a run with a different config; use another "
                            "output.dir, or --force to start this run from scratch there.")
        load_adapter_weights_into(
            self.bare_unet, adapter, misfit=f"The checkpoint {folder} does not fit this run's "
            "adapter", remedy="Was it trained with other waveft settings (target_modules, n_frequency, "
            "n_frequency_pattern) or for another model? Use the same settings, or another output.dir.")
        self.text_encoders.load(folder)
        self.invocations = list(state.get("invocations", []))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.ema.load_state_dict(state.get("ema"), source=str(folder))
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        step, max_steps = int(state["step"]), self.config.train.max_steps
        if self.accelerator.is_main_process:
            where = (f"step {step} of {max_steps}" if step <= max_steps else
                     f"step {step}, past train.max_steps {max_steps}: the run finishes there without training further")
            print(f"Resuming from {folder} ({where}).", flush=True)
        return step

    # ------------------------------------------------------------------------------------------ training
    def train(self) -> None:
        """Collective. The loop; after each step: log (main), checkpoint and validate when due (both collective)."""
        config, accelerator = self.config, self.accelerator
        train = config.train
        settings = LoopSettings(
            max_steps=train.max_steps, gradient_accumulation=train.gradient_accumulation,
            max_grad_norm=train.max_grad_norm, prediction_type=self.prediction_type, snr_gamma=train.snr_gamma,
            noise_offset=train.noise_offset, seed=train.seed,
            prior_loss_weight=config.prior.loss_weight if config.prior.enabled else None,
        )
        input_dtype = torch.float32 if train.mixed_precision != "no" else DTYPES[config.model.dtype]
        self.stop.end_run_if_asked(accelerator, saved=None)
        steps = training_steps(
            accelerator=accelerator, unet=self.unet, noise_scheduler=self.components.training_noise_scheduler(),
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, batches=iter(self._loader()),
            conditioning=self.conditioning, settings=settings, trainable_params=self.trainable, text_encoders=self.text_encoders,
            start_step=self.start_step, input_dtype=input_dtype, progress=self.progress, ema=self.ema,
        )
        with closing(steps):  # an error between steps closes the progress bar, so no message lands on its line
            for step, step_metrics in steps:
                metrics = step_metrics.read()  # the step's one wait for the device; raises if it diverged
                self.step, self.final_loss = step, metrics["loss"]
                self.step_seconds.append(metrics["seconds"])
                self._log(step, metrics)
                if step < train.max_steps and self.stop.agreed(accelerator):
                    self.save_checkpoint(step)
                    self.stop.end_run_if_asked(accelerator, saved=step)
                if train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.max_steps:
                    self.save_checkpoint(step)
                if config.validation.every and step % config.validation.every == 0 and step < train.max_steps:
                    self.validate(step)
        if self.start_step < train.max_steps:  # always: a rerun or a raised max_steps continues from here
            self.save_checkpoint(self.step)
        self.validate(self.step)  # the final grid (whenever validation prompts are set)

    def _loader(self):
        """This process's endless batches, starting where step `start_step` left off."""
        train, accelerator, examples = self.config.train, self.accelerator, self.conditioning.examples
        sampler = StepBatchSampler(
            [self.dataset.bucket_of(position) for position in range(len(self.dataset))], batch_size=train.batch_size,
            accumulation=train.gradient_accumulation, seed=train.seed, start_step=self.start_step,
            process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        )
        return DataLoader(examples, batch_sampler=sampler, collate_fn=partial(collate, with_prior=self.config.prior.enabled),
                          num_workers=self.config.data.dataloader_workers)

    def _log(self, step: int, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            self.report.step(step, metrics)

    def save_checkpoint(self, step: int) -> None:
        """Collective. Adapter + training state under checkpoints/step-NNNNNN, written atomically by the main process."""
        if not self.method.saves_adapter:
            return
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                "step": step,
                "fingerprint": self.fingerprint,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict(),  # None when off; else the average's tensors and step counter
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "global_batch": self.global_batch,
                "invocations": [*self.invocations, self._invocation()],
                "instance_images": self.image_manifest,
            }
            try:
                checkpoint.save_checkpoint(
                    self.output_dir, step, unet=self.bare_unet,
                    base_model_name_or_path=self.components.base_model_name, training_state=state,
                    keep=self.config.train.checkpoints_keep, prediction_type=self._recorded_prediction_type(),
                    base_metadata=self.components.base_metadata, text_encoders=self.text_encoders.encoders)
            except OSError as error:
                previous = checkpoint.find_latest_checkpoint(self.output_dir)
                raise UserError(
                    f"Could not write the checkpoint for step {step} in {self.output_dir / 'checkpoints'}: {error}. "
                    f"Nothing was half-written; the newest complete checkpoint ({previous or 'none yet'}) is intact. "
                    "Free some disk space and rerun the same command to resume."
                ) from error
        accelerator.wait_for_everyone()

    def _recorded_prediction_type(self) -> str | None:
        """What travels with the adapter: the prediction type only when it differs from the base scheduler's."""
        base = self.components.scheduler.config.get("prediction_type", "epsilon")
        return self.prediction_type if self.prediction_type != base else None

    def validate(self, step: int) -> None:
        """Collective. samples/step-NNNNNN.png: per prompt, the base model's images then the adapter's, same seeds;
        with validation.evaluate, first the scores (evaluation.jsonl), so the rewritten report.html shows them."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and self.scores is not None and self.method.saves_adapter:
            self.scores.score(step, self.components, self.bare_unet, self.conditioning, self.prediction_type)
        if self.accelerator.is_main_process and self.grids.settings.prompts:
            with self.ema.swapped_in():  # with EMA on, the grids show the average
                grid = self.grids.draw(step, self.components, self.bare_unet, self.conditioning, self.prediction_type)
            self.report.validation(step, grid)  # the trackers get the grid; report.html is rewritten
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ the end
    def _invocation(self) -> dict:
        """This invocation's figures so far (they travel in the checkpoints, so a resumed run's summary covers all)."""
        return invocation_record(started_at=self.started_at, start_step=self.start_step, end_step=self.step,
                                 step_seconds=self.step_seconds, wall_seconds=time.perf_counter() - self.started,
                                 num_processes=self.accelerator.num_processes,
                                 peak_memory_bytes=peak_memory_bytes(self.accelerator.device))

    def finish(self) -> None:
        """Collective (one barrier). The final adapter (model card, last sample grid) and summary.json, together."""
        accelerator, config = self.accelerator, self.config
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        trainable_params = sum(parameter.numel() for parameter in self.trainable)
        final_loss = self.final_loss if self.final_loss is not None else (self.report.last_logged or {}).get("loss")
        buckets = dict(sorted(Counter(f"{width}x{height}" for height, width in self.dataset.buckets).items()))
        summary = run_summary([*self.invocations, self._invocation()], trainable_params=trainable_params,
                              buckets=buckets, final_loss=final_loss) | {"adapter_weights": self.ema.which}
        if len(self.concepts) > 1:
            summary["concepts"] = concept_data.concepts_summary(self.concepts, self.dataset)
        saves = self.method.saves_adapter
        card_data = config.data.model_copy(update={"instance_prompt": concept_data.named_prompts(self.concepts)})
        card = model_card(base_model=self.components.base_model_name, waveft=config.waveft, data=card_data,
                          prior=config.prior, train=config.train, validation_prompts=self.grids.settings.prompts,
                          trainable_params=trainable_params, steps=self.step, has_samples=self.grids.last is not None,
                          prediction_type=self._recorded_prediction_type(), base_config=config.model.config) if saves else None
        with self.ema.swapped_in():  # with EMA on, the final adapter holds the average
            adapter_dir = write_final(self.output_dir, summary, unet=self.bare_unet if saves else None,
                                      base_model_name=self.components.base_model_name,
                                      prediction_type=self._recorded_prediction_type(), model_card=card,
                                      last_samples=self.grids.last, base_metadata=self.components.base_metadata,
                                      text_encoders=self.text_encoders.encoders)
        samples = f", samples in {self.output_dir / 'samples'}" if self.grids.last is not None else ""
        report = self.report.finish()
        self.last_words = [f"Done: adapter in {adapter_dir}{samples}." if adapter_dir else "Done.", f"Report: {report}"]

    def cleanup(self) -> None:
        self.accelerator.end_training()  # the trackers' closing words (W&B's summary) come before ours
        if self.last_words:
            print("\n".join(self.last_words), flush=True)

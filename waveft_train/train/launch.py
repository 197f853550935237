"""The process group: one accelerate `Accelerator` for one or many processes, and what it can run here.

DeepSpeed/FSDP configurations are refused (the adapter is tiny, plain data parallelism is what pays); fp16 on the
CPU is refused or downgraded before any model loads; only the main process shows library loading bars.
"""

from __future__ import annotations

import logging
import socket
import uuid
from datetime import timedelta
from pathlib import Path

import diffusers.utils.logging
import torch
import transformers.utils.logging
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
from accelerate.utils import broadcast_object_list

from waveft_train.common.errors import UserError
from waveft_train.config import ModelSection, TrainSection

logger = logging.getLogger(__name__)


def make_accelerator(train: TrainSection, model: ModelSection, output_dir: Path):
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        log_with=list(train.report_to) or None,
        project_dir=str(output_dir),
        kwargs_handlers=[
            # The adapter's index tensors are buffers; they never change, so DDP need not re-send them each step.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            # Validation and class images run on the main process while the others wait at a barrier.
            InitProcessGroupKwargs(timeout=timedelta(hours=3)),
        ],
    )
    check_precision(accelerator.device.type, model.dtype, train.mixed_precision)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise UserError(
            f"This accelerate configuration uses {accelerator.distributed_type.value}, which waveft-train does not "
            "support yet: the adapter is tiny, so plain data parallelism is what pays. Launch with "
            "`accelerate launch --multi_gpu --num_processes N -m waveft_train --config ...` instead."
        )
    if not accelerator.is_main_process:  # one set of loading bars and library warnings, not one per process
        for library in (diffusers.utils.logging, transformers.utils.logging):
            library.disable_progress_bar()
            library.set_verbosity_error()
    return accelerator


def check_precision(device_type: str, weight_dtype: str, mixed_precision: str) -> None:
    """fp16 needs a GPU: accelerate runs no fp16 autocast on the CPU, and torch's CPU autocast skips fp16 weights."""
    fp16 = [f"{key}: fp16" for key, value in (("model.dtype", weight_dtype), ("train.mixed_precision", mixed_precision))
            if value == "fp16"]
    if device_type != "cpu" or not fp16:
        return
    if weight_dtype == "fp32":
        logger.warning("train.mixed_precision: fp16 has no effect on the CPU (accelerate runs fp16 autocast only on "
                       "GPUs): this run trains in fp32. Use train.mixed_precision: bf16 for mixed precision here.")
        return
    raise UserError(
        f"{' with '.join(fp16)} needs a GPU: on the CPU accelerate runs no fp16 mixed precision and torch's "
        "autocast does not cover fp16 weights, so the first step would fail. On the CPU use "
        "train.mixed_precision: bf16 (or no) with model.dtype: bf16 or fp32."
    )


def check_shared_folders(accelerator, folders: dict[str, Path]) -> None:
    """Collective. Refuse, on every process alike, folders that some process does not see as the main process does.

    The main process writes a marker file into each folder; every process then looks for it. With one process
    (or one machine's local disk shared by all processes) this costs a file write and two barriers.
    """
    if accelerator.num_processes == 1:
        return
    token = broadcast_object_list([f".waveft-train-shared-{uuid.uuid4().hex[:12]}"])[0]
    if accelerator.is_main_process:
        for folder in folders.values():
            (folder / token).touch()
    accelerator.wait_for_everyone()
    unseen = [key for key, folder in folders.items() if not (folder / token).exists()]
    flags = accelerator.gather(torch.tensor([[float(key in unseen) for key in folders]], device=accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for folder in folders.values():
            (folder / token).unlink(missing_ok=True)
    missing = [key for index, key in enumerate(folders) if flags[:, index].max() > 0]
    if missing:
        culprits = ", ".join(f"{key} ({folders[key]})" for key in missing)
        raise UserError(
            f"{culprits} is not on storage that every process sees (process {accelerator.process_index} on "
            f"{socket.gethostname()} {'does not' if unseen else 'does, but another one does not'} see what the main "
            "process writes there). With several machines, output.dir and prior.class_dir must be on a shared "
            "filesystem (NFS, Lustre, a mounted bucket): the main process writes the checkpoints every process resumes "
            "from, and each process writes its share of the class images."
        )

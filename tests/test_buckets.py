"""Aspect-ratio buckets: the bucket list, cover-and-crop transforms, one bucket per step, layout-invariant order,
and a 3:2 photo trained in a 3:2 bucket with the matching SDXL time ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from waveft_train.config import load_config
from waveft_train.data.buckets import SDXL_BUCKETS, bucket_sizes, cover_size, nearest_bucket
from waveft_train.data.dataset import StepBatchSampler, epoch_indices, item_rng, transform_image
from waveft_train.train import loop as trainer
from waveft_train.train import run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "data" / "tiny.yaml"
SUBJECT = REPO / "tests" / "data" / "subject"


def test_the_bucket_list_is_sdxls_about_one_megapixel_scaled_to_the_resolution():
    sizes = bucket_sizes(1024)
    assert sorted(sizes) == sorted(SDXL_BUCKETS) and (1024, 1024) in sizes and (1216, 832) in sizes
    assert all(0.85 < width * height / 1024**2 < 1.05 for width, height in sizes)
    assert all(width % 64 == 0 and height % 64 == 0 for width, height in sizes)
    for resolution in (512, 768, 64):
        scaled = bucket_sizes(resolution)
        assert (resolution, resolution) in scaled and all(w % 8 == 0 and h % 8 == 0 for w, h in scaled)
    assert nearest_bucket(3000, 2000, sizes) == (1216, 832) and nearest_bucket(2000, 3000, sizes) == (832, 1216)
    assert nearest_bucket(500, 500, sizes) == (1024, 1024)
    assert nearest_bucket(96, 64, bucket_sizes(64)) == (72, 48)  # exactly 3:2 at 64 px
    assert cover_size(3000, 2000, (1216, 832)) == (1248, 832)  # one side matches, the other just covers


def test_a_photo_is_resized_to_cover_its_bucket_and_only_the_excess_is_cropped():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(128, 192, 3), dtype=np.uint8)  # 3:2, height 128, width 192
    out = transform_image(Image.fromarray(array), resolution=64, center_crop=False, random_flip=False,
                          rng=item_rng(0, 0, 0, "instance"), target=(48, 72))
    assert out.pixel_values.shape == (3, 48, 72)
    assert out.original_size == (128, 192) and out.crop_top_left == (0, 0) and out.target_size == (48, 72)
    expected = np.asarray(Image.fromarray(array).resize((72, 48), Image.Resampling.BILINEAR), dtype=np.float32)
    torch.testing.assert_close(out.pixel_values, torch.from_numpy(expected / 127.5 - 1).permute(2, 0, 1))
    square = transform_image(Image.fromarray(array), resolution=64, center_crop=True, random_flip=False,
                             rng=item_rng(0, 0, 0, "instance"))
    assert square.pixel_values.shape == (3, 64, 64) and square.crop_top_left == (0, 16)  # the old square crop


def steps(sampler: StepBatchSampler, count: int, per_step: int) -> list[list[int]]:
    """The global batch of each step, gathered from one process's micro-batches (or several processes')."""
    flat = [index for _, batch in zip(range(count * per_step), iter(sampler)) for index in batch]
    return [flat[i:i + len(flat) // count] for i in range(0, len(flat), len(flat) // count)]


def global_steps(buckets, *, batch_size, accumulation, processes, count=12, start_step=0) -> list[list[int]]:
    per_process = [list(zip(range(count * accumulation), iter(StepBatchSampler(
        buckets, batch_size=batch_size, accumulation=accumulation, seed=3, start_step=start_step,
        process_index=rank, num_processes=processes))))
        for rank in range(processes)]
    result = []
    for step in range(count):
        indices = []
        for micro in range(accumulation):
            for rank in range(processes):
                indices += per_process[rank][step * accumulation + micro][1]
        result.append(indices)
    return result


BUCKETS = [(48, 72)] * 3 + [(72, 48)] * 2 + [(64, 64)] * 4  # positions' (height, width)


def test_every_step_draws_its_global_batch_from_one_bucket():
    drawn = global_steps(BUCKETS, batch_size=2, accumulation=2, processes=1, count=40)
    for indices in drawn:
        assert len({BUCKETS[index % len(BUCKETS)] for index in indices}) == 1
    seen = {BUCKETS[index % len(BUCKETS)] for indices in drawn for index in indices}
    assert seen == set(BUCKETS)  # every bucket gets its turn


def test_the_order_depends_on_the_global_batch_only_and_resumes_exactly():
    reference = global_steps(BUCKETS, batch_size=2, accumulation=1, processes=1)
    assert global_steps(BUCKETS, batch_size=1, accumulation=1, processes=2) == reference
    assert global_steps(BUCKETS, batch_size=1, accumulation=2, processes=1) == reference
    assert global_steps(BUCKETS, batch_size=1, accumulation=1, processes=2, start_step=5, count=7) == reference[5:]
    assert global_steps(BUCKETS, batch_size=4, accumulation=1, processes=1) != reference  # another global batch


def test_one_bucket_walks_plain_shuffled_epochs():
    drawn = [index for indices in global_steps([(64, 64)] * 5, batch_size=2, accumulation=1, processes=1, count=5)
             for index in indices]
    assert drawn == epoch_indices(5, epoch=0, seed=3) + epoch_indices(5, epoch=1, seed=3)


def three_to_two_photos(folder: Path) -> Path:
    folder.mkdir()
    for index, name in enumerate(("ball_01.png", "ball_04.png")):
        canvas = Image.new("RGB", (192, 128), (40 + 60 * index, 120, 200))
        canvas.paste(Image.open(SUBJECT / name).convert("RGB").resize((128, 128)), (32, 0))
        canvas.save(folder / f"wide_{index}.png")
    return folder


@pytest.mark.parametrize("bucketing", [True, False])
def test_a_3_2_photo_trains_in_a_3_2_bucket_with_matching_time_ids(tmp_path, monkeypatch, bucketing):
    photos = three_to_two_photos(tmp_path / "photos")
    seen: list[torch.Tensor] = []
    real_loss = trainer.diffusion_loss

    def recording(unet, noise_scheduler, inputs, *args, **kwargs):
        seen.append(inputs.time_ids.clone())
        assert inputs.latents.shape[-2:] == ((24, 36) if bucketing else (32, 32))  # the tiny VAE downsamples by 2
        return real_loss(unet, noise_scheduler, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "diffusion_loss", recording)
    values = {"model.pretrained": "tiny", "output.dir": tmp_path / "run", "data.instance_dir": photos,
              "data.resolution": 64, "data.bucketing": bucketing, "data.center_crop": True,
              "prior.class_dir": tmp_path / "class", "prior.num_class_images": 1, "prior.generation_steps": 1,
              "train.max_steps": 2, "train.gradient_accumulation": 1, "train.checkpoint_every": 0,
              "validation.every": 0, "validation.prompts": "[]", "waveft.n_frequency": 64}
    output_dir = run.train_from_config(load_config(DEMO, [f"{key}={value}" for key, value in values.items()]),
                                       progress=False)
    instance_ids = torch.stack([ids[0] for ids in seen]).tolist()
    class_ids = torch.stack([ids[1] for ids in seen]).tolist()
    if bucketing:  # the whole photo, uncropped, at 72x48
        assert instance_ids == [[128, 192, 0, 0, 48, 72]] * 2
        assert all(ids[4:] == [48, 72] for ids in class_ids)  # the square class image, cropped into the bucket
        assert json.loads((output_dir / "summary.json").read_text())["buckets"] == {"72x48": 2}
    else:  # the old square crop: 64 px tall, 32 px cut off the sides
        assert instance_ids == [[128, 192, 0, 16, 64, 64]] * 2
        assert json.loads((output_dir / "summary.json").read_text())["buckets"] == {"64x64": 2}

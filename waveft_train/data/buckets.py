"""Aspect-ratio buckets: train each photo near its own shape instead of cropping it to a square.

SDXL was trained on about 1 megapixel in many aspect ratios; the bucket list is the one of the SDXL report
(arXiv 2307.01952, appendix I), widths and heights in multiples of 64 at 1024 px, scaled to `data.resolution`
(rounded to multiples of 8, the VAE's factor). Each photo goes to the bucket closest to its aspect ratio and is
resized to cover it, so the crop removes only what the difference in aspect ratio forces. SDXL's time ids then
carry the photo's true original size, the crop corner, and the bucket as the target size. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# (width, height) at 1024 px: the SDXL report's multi-aspect list, from 1:4 to 4:1.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """The bucket list scaled to `resolution` (its square bucket is resolution × resolution), as (width, height)."""
    scale = resolution / 1024
    sizes = {(max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))
             for width, height in SDXL_BUCKETS}
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height (in log ratio, so 2:1 and 1:2 are equally far)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), size))


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(width, height) to resize to so the image covers `bucket` with the smallest crop (one side matches)."""
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    return max(bucket_width, int(width * scale)), max(bucket_height, int(height * scale))


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"

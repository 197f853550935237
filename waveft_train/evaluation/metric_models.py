"""The metric models of the DreamBooth paper as ordinary transformers checkpoints: DINO ViT-S/16 and CLIP.

- DINO: `ViTModel`, the CLS token of the last hidden state (after the final layer norm), as DINO's own evaluation
  reads it. Default facebook/dino-vits16 at revision refs/pr/1: that repository's main branch holds only a pickle
  (pytorch_model.bin); the safetensors conversion lives in its pull-request branch refs/pr/1.
- CLIP: `CLIPModel`, the projected image and text embeddings (`image_embeds`, `text_embeds` of its forward). Default
  openai/clip-vit-large-patch14 (model.safetensors on main). Similarities are plain cosines, ×1 (not ×100, not the
  CLIPScore rescaling ×2.5).

A name is `tiny` (random test models, models/tiny_metrics.py), a local folder, or a hub id with an optional
`@revision` (a branch, tag, commit or refs/pr/N). Weights load from model.safetensors only
(`use_safetensors=True`), images go through the checkpoint's own image processor (and text through its tokenizer),
and nothing runs remote code. Every feature is L2-normalised, so a dot product is a cosine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

from waveft_train.common.errors import UserError
from waveft_train.common.paths import is_local, written_as_path
from waveft_train.config import ValidationSection
from waveft_train.models.sources import first_line, offline_note
from waveft_train.models.tiny_metrics import tiny_metric_model_dir

DEFAULT_DINO = ValidationSection.model_fields["dino_model"].default  # the config's defaults, named once there
DEFAULT_CLIP = ValidationSection.model_fields["clip_model"].default
FEATURE_BATCH = 32


def split_revision(name: str) -> tuple[str, str | None]:
    """`owner/name@revision` -> (owner/name, revision); an existing path, or one written as a path, is never split."""
    repo, _, revision = name.rpartition("@")
    if not repo or Path(name).expanduser().exists() or written_as_path(repo):
        return name, None
    return repo, revision or None


def _source(name: str, kind: str) -> tuple[str, str | None]:
    """(what from_pretrained reads, revision) for `tiny`, a folder or a hub id."""
    if name.strip() == "tiny":
        return str(tiny_metric_model_dir(kind)), None
    repo, revision = split_revision(name.strip())
    if is_local(repo) and not Path(repo).expanduser().is_dir():
        raise UserError(f"The {kind.upper()} metric model '{name}' is written as a local folder, but there is no "
                        f"folder {Path(repo).expanduser().absolute()}. Give a folder holding config.json and "
                        "model.safetensors, a hub id, or `tiny` (random weights, for tests).")
    return str(Path(repo).expanduser()) if is_local(repo) else repo, revision


def _download_hint(name: str, repo: str, revision: str | None) -> str:
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    return (f"On a machine with internet access, `{fetch}` puts it in the Hugging Face cache (copy that cache "
            f"here), or save the model with save_pretrained(FOLDER, safe_serialization=True) and pass the folder "
            f"(--dino/--clip FOLDER, or validation.dino_model/clip_model in the config) instead of '{name}'")


def _loaded(kind: str, name: str, load):
    """Run the loader; what cannot be found or is not safetensors becomes one UserError naming the model."""
    source, revision = _source(name, kind)
    try:
        return load(source, revision)
    except (OSError, ValueError) as error:  # OSError covers the hub's HTTP errors and a missing model.safetensors
        local = Path(source).is_dir()
        where = "the folder" if local else "the hub id"
        raise UserError(
            f"Could not load the {kind.upper()} metric model '{name}' ({where} {source}"
            f"{'' if revision is None else f' at revision {revision}'}): {first_line(error)}."
            f"{offline_note(not local)} It must be a transformers checkpoint with model.safetensors (pickled "
            f"weights are never loaded). {_download_hint(name, source, revision)}."
        ) from None


@dataclass
class MetricModels:
    """DINO and CLIP, frozen, in fp32. They wait on the CPU and compute on `device` inside `on_device()`, so that
    during training they take no accelerator memory while the run trains or samples (CLIP ViT-L/14 is 1.7 GB)."""

    dino: ViTModel
    dino_processor: object
    clip: CLIPModel
    clip_processor: CLIPProcessor
    names: dict[str, str]
    device: torch.device

    @contextmanager
    def on_device(self) -> Iterator[MetricModels]:
        for model in (self.dino, self.clip):
            model.to(self.device)
        try:
            yield self
        finally:
            for model in (self.dino, self.clip):
                model.to("cpu")

    @torch.no_grad()
    def dino_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit DINO CLS features."""
        return self._batched(images, lambda chunk: self.dino(**self._pixels(self.dino_processor, chunk))
                             .last_hidden_state[:, 0])

    @torch.no_grad()
    def clip_image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, P) unit CLIP image embeddings (the vision tower's pooled output through the visual projection)."""
        def embed(chunk):
            pixels = self._pixels(self.clip_processor.image_processor, chunk)["pixel_values"]
            return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)
        return self._batched(images, embed)

    @torch.no_grad()
    def clip_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, P) unit CLIP text embeddings (the text tower's pooled output through the text projection)."""
        def embed(chunk):
            tokens = self.clip_processor.tokenizer(list(chunk), padding=True, truncation=True, return_tensors="pt")
            tokens = {key: value.to(self.device) for key, value in tokens.items()}
            pooled = self.clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return self.clip.text_projection(pooled.pooler_output)
        return self._batched(texts, embed)

    def _pixels(self, processor, images) -> dict[str, torch.Tensor]:
        inputs = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.device, torch.float32)}

    @staticmethod
    def _batched(items: Sequence, embed) -> torch.Tensor:
        chunks = [embed(items[start:start + FEATURE_BATCH]).float() for start in range(0, len(items), FEATURE_BATCH)]
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()


def load_metric_models(dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP, *, device: str = "cpu") -> MetricModels:
    """Both metric models (see the module docstring for the names), frozen, to compute on `device`."""
    def dino_loader(source, revision):
        model = ViTModel.from_pretrained(source, revision=revision, use_safetensors=True, add_pooling_layer=False)
        return model, AutoImageProcessor.from_pretrained(source, revision=revision)

    def clip_loader(source, revision):
        model = CLIPModel.from_pretrained(source, revision=revision, use_safetensors=True)
        return model, CLIPProcessor.from_pretrained(source, revision=revision)

    dino_model, dino_processor = _loaded("dino", dino, dino_loader)
    clip_model, clip_processor = _loaded("clip", clip, clip_loader)
    for model in (dino_model, clip_model):
        model.requires_grad_(False)
        model.eval()
        model.float()
    return MetricModels(dino_model, dino_processor, clip_model, clip_processor, {"dino": dino, "clip": clip},
                        torch.device(device))

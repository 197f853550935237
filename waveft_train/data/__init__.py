"""What a run trains on: subject and class image folders (images), aspect-ratio buckets (buckets), the DreamBooth
dataset, collate and per-process batch sampler (dataset), class-image generation for prior preservation (prior),
and prompt embeddings, time ids and latents with their caches (encode)."""

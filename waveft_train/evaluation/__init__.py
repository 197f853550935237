"""Scores of adapters: the DreamBooth paper's metrics on real SDXL (DINO, CLIP-I, CLIP-T, diversity) with ordinary
transformers checkpoints, the toy judge on the toy world, a colour measure of class drift, and the rule that ranks a
run's checkpoints. train/scoring.py applies them to a run's folder (evaluation.jsonl, evaluation.json)."""

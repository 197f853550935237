"""One training run: the recipe that sees the whole config (run), checks before weights load (preflight), the
accelerate process group (launch), optimizer and schedule (optim), the loop (loop), checkpoints (checkpoint),
signals (stopping), metrics.jsonl (metrics), the model card (model_card), and the `params` budget and memory
estimate (params, memory)."""

"""The `waveft-train` command line: main (training, params, init, error handling), adapters (sample, export,
evaluate). Imports torch, diffusers and peft only inside the commands, so `--help` and config errors are fast."""

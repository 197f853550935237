"""What every layer shares, and nothing else: the user-facing error (errors), atomic file and folder writes (files),
the naming rules for local paths vs hub ids (paths) and the one-writer-per-folder lock (lock). Imports nothing
from the rest of the package and no torch."""

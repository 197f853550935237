"""The run configuration: typed schema (`schema`), reading and overrides (`loading`), error wording (`errors`),
generated documentation (`docs`). Torch-free, so `init` and config checks stay instant."""

from waveft_train.config.docs import STARTER_PATH
from waveft_train.config.loading import (
    NOT_IN_FINGERPRINT,
    config_fingerprint,
    config_from_mapping,
    dump_config,
    folder_problems,
    load_config,
)
from waveft_train.config.schema import (
    SECTIONS,
    DataSection,
    ModelSection,
    OutputSection,
    PriorSection,
    TrainConfig,
    TrainSection,
    ValidationSection,
    WaveFTSection,
)


def starter_config_text() -> str:
    """A documented starter config for `waveft-train init`; it loads as is (paths are placeholders)."""
    return STARTER_PATH.read_text(encoding="utf-8")


__all__ = ["NOT_IN_FINGERPRINT", "SECTIONS", "DataSection", "ModelSection", "OutputSection", "PriorSection",
           "TrainConfig", "TrainSection", "ValidationSection", "WaveFTSection", "config_fingerprint",
           "config_from_mapping", "dump_config", "folder_problems", "load_config", "starter_config_text"]

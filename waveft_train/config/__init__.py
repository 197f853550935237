"""The run configuration: typed schema (`schema`), reading and overrides (`loading`), error wording (`errors`),
generated documentation (`docs`, imported where needed, since `python -m waveft_train.config.docs` runs it).
Torch-free, so `init` and config checks stay instant."""

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

__all__ = ["NOT_IN_FINGERPRINT", "SECTIONS", "DataSection", "ModelSection", "OutputSection", "PriorSection",
           "TrainConfig", "TrainSection", "ValidationSection", "WaveFTSection", "config_fingerprint",
           "config_from_mapping", "dump_config", "folder_problems", "load_config"]

"""Checks across sections that would crowd schema.py: the text-encoder settings (waveft.text_encoders and the train
keys that only mean something with it). Torch-free."""

from __future__ import annotations

from typing import Any

# waveft keys that are the trainer's, not peft's WaveFTConfig's (left out of `WaveFTSection.peft_kwargs`)
TEXT_ENCODER_FIELDS = ("text_encoders", "text_encoder_n_frequency")


def check_text_encoder_settings(config: Any) -> Any:
    """Text-encoder keys set while waveft.text_encoders is off would change nothing, and a stop step past the last
    step would never stop: both are refused before any model loads."""
    waveft, train = config.waveft, config.train
    given = [name for name, value in (("waveft.text_encoder_n_frequency", waveft.text_encoder_n_frequency),
                                      ("train.text_encoder_lr", train.text_encoder_lr),
                                      ("train.text_encoder_stop_step", train.text_encoder_stop_step)) if value is not None]
    if given and not waveft.text_encoders:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but waveft.text_encoders is "
                         "false, so the text encoders are not trained and the setting would change nothing; set "
                         "waveft.text_encoders: true, or remove it")
    stop = train.text_encoder_stop_step
    if stop is not None and stop > train.max_steps:
        raise ValueError(f"train.text_encoder_stop_step ({stop}) is past train.max_steps ({train.max_steps}), so the "
                         "text encoders would never stop training; set it to at most max_steps (e.g. "
                         f"{max(1, train.max_steps // 2)}), or null to train them every step")
    if train.optimizer == "prodigy" and train.text_encoder_lr is not None and train.text_encoder_lr < 0.1:
        raise ValueError(f"train.text_encoder_lr is {train.text_encoder_lr} with train.optimizer: prodigy, which multiplies "
                         "its own step size by the learning rate, so the text encoders would barely train; set it to "
                         "about 1.0 (e.g. 0.5 to be gentler on them), or null to use train.learning_rate")
    return config

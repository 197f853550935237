"""Captions: `.txt` files beside the photos and their rule with metadata.jsonl, caption dropout and tag shuffling.

The training-level checks live with the tests they extend: a folder with `.txt` captions trains the adapter its
metadata.jsonl twin trains (test_train.py), and dropout and shuffling keep one adapter on any layout and across a
resume (test_scale_out.py)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers import captioned_subject, doc_code_blocks, doc_command

from waveft_train.common.errors import UserError
from waveft_train.config import DataSection, config_fingerprint, load_config
from waveft_train.config.loading import fingerprint_fields
from waveft_train.data.caption_variation import CaptionVariation, caption_rng, shuffled_tags, tags_of
from waveft_train.data.encode import Conditioning, encode_prompts
from waveft_train.data.images import image_manifest, load_images, manifest_changes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"
PHOTOS = ("ball_01.png", "ball_02.png", "ball_03.png")


def subject_folder(folder: Path, captions: dict[str, str] | None = None, metadata: dict[str, str] | None = None) -> Path:
    return captioned_subject(folder, captions, metadata, photos=PHOTOS)


def logged(caplog: pytest.LogCaptureFixture, function, *args, **kwargs):
    """`function`'s result and what it logged through the waveft_train logger (the CLI may stop its propagation)."""
    logger = logging.getLogger("waveft_train")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="waveft_train")
    try:
        result = function(*args, **kwargs)
    finally:
        logger.removeHandler(caplog.handler)
    return result, " ".join(record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------------------------- caption files
def test_a_txt_file_beside_a_photo_is_its_caption_and_a_blank_one_falls_back_like_metadata(tmp_path, caplog):
    folder = subject_folder(tmp_path / "photos", {"ball_01.png": "sks toy, stripes\n", "ball_02.png": " \n"})
    images, messages = logged(caplog, load_images, folder, caption_column="text", default_prompt="a photo of sks toy")
    assert images.prompts == ("sks toy, stripes", "a photo of sks toy", "a photo of sks toy")
    assert "ball_02.png" in messages and "no caption" in messages  # the blank one is named, as a blank metadata one
    assert "LICENSE.txt (not an image)" in messages  # a .txt that captions no photo is a skipped file, as before
    assert "ball_01.txt (not an image)" not in messages  # a caption file is no stray file


def test_txt_captions_are_not_used_without_caption_column_and_the_warning_says_what_to_set(tmp_path, caplog):
    folder = subject_folder(tmp_path / "photos", dict.fromkeys(PHOTOS, "sks toy, stripes"))
    images, messages = logged(caplog, load_images, folder, caption_column=None, default_prompt="a photo of sks toy")
    assert images.prompts == ("a photo of sks toy",) * 3  # a config that worked before means what it meant
    assert "3 photo(s) have a caption file beside them (ball_01.txt, ball_02.txt, ball_03.txt)" in messages
    assert "set data.caption_column: text" in messages


def test_txt_and_metadata_jsonl_complete_each_other_where_they_agree(tmp_path):
    folder = subject_folder(tmp_path / "photos", {"ball_01.png": "first", "ball_02.png": "second"},
                            {"ball_01.png": "first", "ball_02.png": "", "ball_03.png": "third"})
    images = load_images(folder, caption_column="text", default_prompt="p")
    assert images.prompts == ("first", "second", "third")


def test_a_photo_captioned_differently_in_both_is_refused_naming_the_photo_and_both_files(tmp_path):
    folder = subject_folder(tmp_path / "photos", {"ball_01.png": "same", "ball_02.png": "a red ball",
                                                  "ball_03.png": "a blue ball"},
                            {"ball_01.png": "same", "ball_02.png": "a green ball", "ball_03.png": "a cube"})
    with pytest.raises(UserError) as caught:
        load_images(folder, caption_column="text", default_prompt="p")
    message = str(caught.value)
    base = folder.resolve()
    assert f"The photo {base / 'ball_02.png'} is captioned twice" in message
    assert f"{base / 'ball_02.txt'} says 'a red ball'" in message
    assert f"{folder / 'metadata.jsonl'} says 'a green ball'" in message
    assert "(1 more photo(s) differ too)" in message and "\n" not in message


@pytest.mark.parametrize("content, fragment", [
    (b"first caption\nsecond caption\n", "holds 2 lines of text"),
    (b"caf\xe9", r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
])
def test_a_caption_file_holds_one_caption_in_utf8(tmp_path, content, fragment):
    folder = subject_folder(tmp_path / "photos")
    (folder / "ball_02.txt").write_bytes(content)
    with pytest.raises(UserError, match=fragment) as caught:
        load_images(folder, caption_column="text", default_prompt="p")
    assert str(folder / "ball_02.txt") in str(caught.value)
    assert load_images(folder, caption_column=None, default_prompt="p").prompts == ("p",) * 3  # unused: not read


def test_a_changed_txt_caption_is_a_changed_photo_to_a_resume(tmp_path):
    folder = subject_folder(tmp_path / "photos", dict.fromkeys(PHOTOS, "sks toy"))
    before = image_manifest(load_images(folder, caption_column="text", default_prompt="p"))
    (folder / "ball_03.txt").write_text("sks toy, on the beach", encoding="utf-8")
    now = image_manifest(load_images(folder, caption_column="text", default_prompt="p"))
    assert manifest_changes(before, now) == f"1 changed ({folder.resolve() / 'ball_03.png'})"


# ----------------------------------------------------------------------------------------------- variation
def test_shuffled_tags_keep_the_leading_tags_and_come_from_seed_and_position():
    caption = "sks dog, sitting, grass,  sunny , red collar,, close-up, outdoors"
    tags = tags_of(caption)
    assert tags == ["sks dog", "sitting", "grass", "sunny", "red collar", "close-up", "outdoors"]
    variation = CaptionVariation(seed=7, shuffle_tags=True, keep_tags=2)
    orders = [variation.caption_for(caption, position) for position in range(20)]
    for shuffled in orders:
        assert shuffled.split(", ")[:2] == ["sks dog", "sitting"]
        assert sorted(shuffled.split(", ")) == sorted(tags)
    assert orders == [variation.caption_for(caption, position) for position in range(20)]  # seed + position: same
    assert len(set(orders)) > 10  # positions differ (5! = 120 orders)
    other_seed = CaptionVariation(seed=8, shuffle_tags=True, keep_tags=2)
    assert orders != [other_seed.caption_for(caption, position) for position in range(20)]
    assert shuffled_tags("a, b", 5, caption_rng(0, 0)) == "a, b"  # everything kept
    assert shuffled_tags("a photo of sks dog", 0, caption_rng(0, 0)) == "a photo of sks dog"  # one tag


def test_caption_dropout_drops_its_share_and_the_same_examples_whether_or_not_tags_shuffle():
    positions = range(20_000)
    dropping = CaptionVariation(seed=3, dropout=0.1)
    dropped = [dropping.caption_for("sks dog, grass", position) is None for position in positions]
    assert abs(np.mean(dropped) - 0.1) < 0.01
    both = CaptionVariation(seed=3, dropout=0.1, shuffle_tags=True)
    assert dropped == [both.caption_for("sks dog, grass", position) is None for position in positions]
    assert CaptionVariation(seed=3).caption_for("sks dog, grass", 5) == "sks dog, grass"  # off: as written


def test_conditioning_varies_the_subject_captions_by_run_position_and_drops_to_zeros(tiny_components):
    captions = ("sks toy, red, stripes, grass", "sks toy, blue, dots, sand")
    dataset = SimpleNamespace(instance_images=SimpleNamespace(prompts=captions),
                              class_images=SimpleNamespace(prompts=("a photo of toy",) * 2))
    variation = CaptionVariation(seed=0, dropout=0.4, shuffle_tags=True, keep_tags=1)
    conditioning = Conditioning(tiny_components, dataset, device=torch.device("cpu"), cache_latents=False,
                                progress=False, captions=variation)
    encoders = ([tiny_components.tokenizer, tiny_components.tokenizer_2],
                [tiny_components.text_encoder, tiny_components.text_encoder_2])
    class_embeds, class_pooled = encode_prompts(["a photo of toy"], *encoders)
    seen = set()
    for first in range(0, 12, 2):
        batch = {"images": torch.zeros(4, 3, 16, 16), "prompts": [*captions, "a photo of toy", "a photo of toy"],
                 "original_sizes": torch.zeros(4, 2), "crop_top_lefts": torch.zeros(4, 2),
                 "target_sizes": torch.zeros(4, 2), "num_instance": 2}
        inputs = conditioning(batch, first_position=first)
        for index, caption in enumerate(captions):
            varied = variation.caption_for(caption, first + index)
            seen.add(varied is None)
            if varied is None:  # the unconditional input: zeros
                assert not inputs.prompt_embeds[index].any() and not inputs.pooled[index].any()
            else:
                embeds, pooled = encode_prompts([varied], *encoders)
                torch.testing.assert_close(inputs.prompt_embeds[index], embeds[0])
                torch.testing.assert_close(inputs.pooled[index], pooled[0])
        for index in (2, 3):  # class examples keep their prompt
            torch.testing.assert_close(inputs.prompt_embeds[index], class_embeds[0])
            torch.testing.assert_close(inputs.pooled[index], class_pooled[0])
    assert seen == {True, False}  # both kinds happened


# ----------------------------------------------------------------------------------------------- config, docs
def test_caption_settings_are_checked_and_change_the_run_s_identity():
    config = load_config(TINY)
    assert not {"caption_dropout", "shuffle_tags", "keep_tags"} & set(fingerprint_fields(config)["data"]), \
        "at their defaults they are left out: runs started before these keys existed keep their fingerprint"
    base = config_fingerprint(config)
    assert config_fingerprint(load_config(TINY, ["data.caption_dropout=0.0", "data.shuffle_tags=false"])) == base
    fingerprints = {config_fingerprint(load_config(TINY, sets)) for sets in (
        ["data.caption_dropout=0.1"], ["data.shuffle_tags=true"], ["data.shuffle_tags=true", "data.keep_tags=1"])}
    assert len(fingerprints) == 3 and base not in fingerprints
    with pytest.raises(UserError, match="data.keep_tags is 2 but data.shuffle_tags is false"):
        load_config(TINY, ["data.keep_tags=2"])
    with pytest.raises(UserError, match="data.caption_dropout"):
        load_config(TINY, ["data.caption_dropout=1.0"])
    with pytest.raises(UserError, match="waveft-train calls it `data.shuffle_tags`"):
        load_config(TINY, ["data.shuffle_caption=true"])


def test_the_documented_caption_settings_load():
    command = doc_command("waveft-train", "data.shuffle_tags")
    words = shlex.split(command)
    sets = [words[index + 1] for index, word in enumerate(words) if word == "--set"]
    data = load_config(TINY, [value for value in sets if not value.startswith("data.instance_dir")]).data
    assert (data.caption_column, data.caption_dropout, data.shuffle_tags, data.keep_tags) == ("text", 0.1, True, 1)
    blocks = [yaml.safe_load(code) for _, code in doc_code_blocks("yaml") if "shuffle_tags" in code]
    assert blocks, "docs/data.md shows the caption settings in a config"
    for block in blocks:
        assert DataSection(**block["data"]).shuffle_tags

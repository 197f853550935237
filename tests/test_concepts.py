"""Several concepts in one run (issue 32 item 3): the concepts list and its rules, kohya-style folders, class images
per class prompt, the instance/class pairing by concept, and runs that train them, on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SUBJECT, SUBJECT_PHOTOS
from safetensors.torch import load_file

from waveft_train.common.errors import UserError
from waveft_train.config import config_from_mapping, load_config
from waveft_train.data.concepts import ConceptsDataset, concepts_dataset, kohya_subfolders, load_concepts
from waveft_train.data.images import images_from_files
from waveft_train.train import run

FAST = {
    "model": {"pretrained": "tiny", "dtype": "fp32"},
    "waveft": {"n_frequency": 128},
    "data": {"resolution": 32},
    "prior": {"num_class_images": 2, "generation_steps": 2, "generation_batch_size": 2},
    "train": {"max_steps": 4, "gradient_accumulation": 1, "checkpoint_every": 2, "mixed_precision": "no",
              "gradient_checkpointing": False, "seed": 0, "learning_rate": 1e-2},
    "validation": {"prompts": [], "every": 0},
}


def photos(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(SUBJECT / name, folder / name)
    return folder


@pytest.fixture
def two_subjects(tmp_path: Path) -> tuple[Path, Path]:
    return photos(tmp_path / "toy", SUBJECT_PHOTOS[:2]), photos(tmp_path / "box", SUBJECT_PHOTOS[2:])


def two_concepts(toy: Path, box: Path, **extra) -> list[dict]:
    return [{"instance_dir": str(toy), "instance_prompt": "a photo of sks toy", "class_prompt": "a photo of toy",
             **extra},
            {"instance_dir": str(box), "instance_prompt": "a photo of ohwx box", "class_prompt": "a photo of box",
             "repeats": 2}]


def config_of(tmp_path: Path, **sections):
    mapping = {**FAST, "output": {"dir": str(tmp_path / "out")}}
    for name, value in sections.items():
        mapping[name] = {**mapping.get(name, {}), **value} if isinstance(value, dict) else value
    return config_from_mapping(mapping, "test.yaml")


def problems(tmp_path: Path, **sections) -> str:
    with pytest.raises(UserError) as error:
        config_of(tmp_path, **sections)
    return str(error.value)


# ----------------------------------------------------------------------------------------------- the config
def test_concepts_config_rules_name_the_key(tmp_path, two_subjects):
    toy, box = two_subjects
    prior = {"class_dir": str(tmp_path / "class")}
    config = config_of(tmp_path, concepts=two_concepts(toy, box), prior=prior)
    assert [concept.repeats for concept in config.concepts] == [1, 2] and config.data.instance_dir is None

    message = problems(tmp_path, concepts=two_concepts(toy, box), prior=prior,
                       data={"instance_dir": str(toy), "instance_prompt": "a photo of sks toy"})
    assert "concepts and data.instance_dir are two ways to name the subject photos" in message
    message = problems(tmp_path, concepts=[{"instance_dirr": str(toy)}], prior=prior)
    assert "unknown key `concepts[0].instance_dirr` (did you mean `concepts[0].instance_dir`?)" in message
    message = problems(tmp_path, concepts=[{"instance_dir": str(toy), "repeats": 0}], prior=prior)
    assert "`concepts[0].repeats`" in message
    message = problems(tmp_path, concepts=[{"instance_dir": str(toy), "instance_prompt": "sks toy"}],
                       prior={"class_dir": str(tmp_path / "class")})
    assert "concepts[0].class_prompt is needed with prior.enabled" in message
    message = problems(tmp_path, concepts=two_concepts(toy, box), prior=prior, data={"repeats": 3})
    assert "data.repeats is read only with data.instance_dir" in message
    message = problems(tmp_path, concepts=[{**two_concepts(toy, box)[0], "class_dir": str(toy)}], prior=prior)
    assert "concepts[0].class_dir" in message and "is the same folder as concepts[0].instance_dir" in message
    message = problems(tmp_path, prior={"enabled": False})
    assert "`data.instance_dir` is required" in message


def test_classic_config_fingerprint_is_unchanged_by_the_new_key(tmp_path):
    """Runs started before `concepts` existed resume: an empty list is left out of the fingerprint."""
    from waveft_train.config.loading import fingerprint_fields

    config = load_config(Path(__file__).parent / "data" / "tiny.yaml")
    assert "concepts" not in fingerprint_fields(config)


def test_a_concept_without_prompt_or_captions_is_refused_as_it_loads(tmp_path, two_subjects):
    toy, box = two_subjects
    config = config_of(tmp_path, concepts=[{"instance_dir": str(toy)}], prior={"enabled": False})
    with pytest.raises(UserError, match=r"`concepts\[0\].instance_prompt` is required"):
        load_concepts(config.concepts, config.data, config.prior, report=False)


def test_two_class_prompts_in_one_class_folder_are_refused(tmp_path, two_subjects):
    toy, box = two_subjects
    shared = str(tmp_path / "class")
    concepts = [{**entry, "class_dir": shared} for entry in two_concepts(toy, box)]
    config = config_of(tmp_path, concepts=concepts, prior={"class_dir": shared})
    with pytest.raises(UserError, match="with different class prompts"):
        load_concepts(config.concepts, config.data, config.prior, report=False)


# ----------------------------------------------------------------------------------------------- kohya folders
def test_kohya_folder_names_give_repeats_and_prompts(tmp_path):
    root = tmp_path / "kohya"
    photos(root / "10_sks dog", SUBJECT_PHOTOS[:2])
    photos(root / "5_ohwx woman, smiling", SUBJECT_PHOTOS[2:3])
    (root / "notes.md").write_text("a note beside the subfolders is fine")
    found = kohya_subfolders(root, "data.instance_dir")
    assert [(sub.repeats, sub.prompt) for sub in found] == [(10, "sks dog"), (5, "ohwx woman, smiling")]
    assert kohya_subfolders(SUBJECT, "data.instance_dir") is None  # a plain folder of photos

    photos(root / "extra", SUBJECT_PHOTOS[3:4])
    with pytest.raises(UserError, match=r"every subfolder must be, but 'extra' is not"):
        kohya_subfolders(root, "data.instance_dir")
    shutil.rmtree(root / "extra")
    shutil.copy(SUBJECT / SUBJECT_PHOTOS[4], root / SUBJECT_PHOTOS[4])
    with pytest.raises(UserError, match="lie beside them and would be left out"):
        kohya_subfolders(root, "data.instance_dir")
    (root / SUBJECT_PHOTOS[4]).unlink()
    photos(root / "0_nothing", SUBJECT_PHOTOS[4:])
    with pytest.raises(UserError, match="needs repeats of at least 1"):
        kohya_subfolders(root, "data.instance_dir")


def test_a_kohya_instance_dir_is_read_as_concepts_with_the_priors_class(tmp_path):
    root = tmp_path / "kohya"
    photos(root / "3_sks toy", SUBJECT_PHOTOS[:2])
    photos(root / "2_ohwx box", SUBJECT_PHOTOS[2:])
    config = config_of(tmp_path, data={"instance_dir": str(root)},
                       prior={"class_dir": str(tmp_path / "class"), "class_prompt": "a photo of toy"})
    concepts = load_concepts(config.concepts, config.data, config.prior, report=False)
    assert [(c.name, c.instance_prompt, c.repeats, len(c.images)) for c in concepts] == [
        ("data.instance_dir/2_ohwx box", "ohwx box", 2, 3), ("data.instance_dir/3_sks toy", "sks toy", 3, 2)]
    assert {c.class_prompt for c in concepts} == {"a photo of toy"}
    assert {c.class_dir for c in concepts} == {tmp_path / "class"}


def test_a_kohya_folder_in_a_concepts_entry_takes_the_entrys_class_and_multiplies_its_repeats(tmp_path, two_subjects):
    toy, box = two_subjects
    root = tmp_path / "people"
    photos(root / "3_ohwx woman", SUBJECT_PHOTOS[:1])
    photos(root / "1_zwx man", SUBJECT_PHOTOS[1:2])
    entry = {"instance_dir": str(root), "class_prompt": "a photo of a person", "repeats": 2}
    config = config_of(tmp_path, concepts=[two_concepts(toy, box)[0], entry], prior={"class_dir": str(tmp_path / "c")})
    concepts = load_concepts(config.concepts, config.data, config.prior, report=False)
    assert [(c.name, c.instance_prompt, c.repeats, c.class_prompt, c.class_dir.name) for c in concepts] == [
        ("concepts[0]", "a photo of sks toy", 1, "a photo of toy", "a_photo_of_toy"),
        ("concepts[1]/1_zwx man", "zwx man", 2, "a photo of a person", "a_photo_of_a_person"),
        ("concepts[1]/3_ohwx woman", "ohwx woman", 6, "a photo of a person", "a_photo_of_a_person")]


# ----------------------------------------------------------------------------------------------- the dataset
def test_each_example_pairs_a_photo_with_a_class_image_of_its_own_concept(tmp_path, two_subjects):
    toy, box = two_subjects
    config = config_of(tmp_path, concepts=two_concepts(toy, box), prior={"class_dir": str(tmp_path / "class"),
                                                                          "num_class_images": 4})
    concepts = load_concepts(config.concepts, config.data, config.prior, report=False)
    class_files = sorted(SUBJECT.glob("*.png"))
    class_images = {concept.class_key: images_from_files(class_files, prompt=concept.class_prompt,
                                                         source=str(concept.class_dir)) for concept in concepts}
    dataset = concepts_dataset(concepts, class_images, resolution=32, seed=0, center_crop=False, random_flip=True,
                               bucketing=True)
    assert isinstance(dataset, ConceptsDataset)
    # toy: 2 photos × 1 repeat, box: 3 × 2; both × 2, the fewest times that shows toy's 4 class images once
    assert dataset.lengths == [4, 12]
    classes = {"a photo of sks toy": "a photo of toy", "a photo of ohwx box": "a photo of box"}
    for index in range(2 * len(dataset)):
        item = dataset[index]
        assert item["instance"]["concept"] == item["class"]["concept"] == dataset.concept_of(index)
        assert item["class"]["prompt"] == classes[item["instance"]["prompt"]]
        assert item["class"]["target_size"] == item["instance"]["target_size"]  # one bucket per item
    assert dataset[3]["instance"]["prompt"] == "a photo of sks toy" and dataset[4]["instance"]["prompt"] == \
        "a photo of ohwx box"
    first, again = dataset[5], dataset[5 + len(dataset)]  # another epoch: the same photo, a fresh crop or flip
    assert first["instance"]["prompt"] == again["instance"]["prompt"]
    one = concepts_dataset(concepts[:1], class_images, resolution=32, seed=0, center_crop=False, random_flip=True,
                           bucketing=True)
    assert not isinstance(one, ConceptsDataset)  # one concept is the classic dataset, unchanged


# ----------------------------------------------------------------------------------------------- runs
def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def test_two_concepts_train_with_class_images_per_class_prompt_shared_when_shared(tmp_path, two_subjects):
    toy, box = two_subjects
    third = photos(tmp_path / "toy2", SUBJECT_PHOTOS[4:])
    concepts = [*two_concepts(toy, box, validation_prompts=["a photo of sks toy"]),
                {"instance_dir": str(third), "instance_prompt": "a photo of zwx toy", "class_prompt": "a photo of toy"}]
    config = config_of(tmp_path, concepts=concepts, prior={"class_dir": str(tmp_path / "class")},
                       validation={"every": 2, "num_images": 1, "steps": 2})
    output_dir = run.train_from_config(config, progress=False)
    folders = sorted(path.name for path in (tmp_path / "class").iterdir())
    assert folders == ["a_photo_of_box", "a_photo_of_toy"]  # the two toy concepts share one set
    for folder in folders:
        assert len(list((tmp_path / "class" / folder).glob("class-*.png"))) == 2
    summary = json.loads((output_dir / "summary.json").read_text())
    assert [(c["name"], c["class_dir"].rsplit("/", 1)[-1]) for c in summary["concepts"]] == [
        ("concepts[0]", "a_photo_of_toy"), ("concepts[1]", "a_photo_of_box"), ("concepts[2]", "a_photo_of_toy")]
    assert sum(c["share"] for c in summary["concepts"]) == pytest.approx(1.0)
    assert (output_dir / "samples" / "step-000004.png").is_file()
    assert max(tensor.abs().max().item() for tensor in adapter_tensors(output_dir).values()) > 0


def test_a_one_entry_concepts_list_trains_the_classic_forms_adapter(tmp_path):
    class_dir = str(tmp_path / "class")
    classic = config_of(tmp_path / "classic", data={"instance_dir": str(SUBJECT), "instance_prompt": "a photo of sks toy"},
                        prior={"class_dir": class_dir, "class_prompt": "a photo of toy"})
    listed = config_of(tmp_path / "listed", prior={"class_dir": class_dir}, concepts=[
        {"instance_dir": str(SUBJECT), "instance_prompt": "a photo of sks toy", "class_prompt": "a photo of toy",
         "class_dir": class_dir}])
    ours, theirs = (adapter_tensors(run.train_from_config(config, progress=False)) for config in (listed, classic))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)  # bit for bit


def _launch_two(config_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "waveft_train",
               "--config", str(config_path), "--set", "train.max_steps=2"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def test_two_concepts_on_two_processes_then_resumed_on_one_match_one_process(tmp_path, two_subjects, monkeypatch):
    """The layout invariance of issue 15 with two concepts: 2 processes for 2 steps, resumed on 1 process with batch 2,
    against 1 process with batch 2 throughout."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy, box = two_subjects

        def write(name: str, batch_size: int) -> Path:
            mapping = {**FAST, "concepts": two_concepts(toy, box), "prior": {**FAST["prior"], "class_dir": str(
                tmp_path / "class")}, "train": {**FAST["train"], "batch_size": batch_size},
                "output": {"dir": str(tmp_path / name)}}
            path = tmp_path / f"{name}-{batch_size}.yaml"
            path.write_text(yaml.safe_dump(mapping))
            return path

        reference = run.train_from_config(load_config(write("one", 2)), progress=False)
        first = _launch_two(write("two-then-one", 1))
        assert first.returncode == 0, first.stderr[-3000:]
        resumed = run.train_from_config(load_config(write("two-then-one", 2)), progress=False)
    finally:
        torch.set_num_threads(threads)
    ours, theirs = adapter_tensors(resumed), adapter_tensors(reference)
    difference = torch.cat([(ours[key] - theirs[key]).flatten() for key in ours]).norm()
    assert (difference / torch.cat([theirs[key].flatten() for key in theirs]).norm()).item() <= 1e-5


# ----------------------------------------------------------------------------------------------- evaluate
def test_bleed_table_reads_each_concepts_subject_on_every_prompt():
    from waveft_train.toy.concepts import ToyConcept, bleed_table
    from waveft_train.toy.judge import Verdict
    from waveft_train.toy.subjects import SUBJECTS

    ball, box = SUBJECTS["striped_ball"], SUBJECTS["checked_box"]
    concepts = [ToyConcept("concepts[0]", ball, "a photo of sks ball", "a photo of a ball"),
                ToyConcept("concepts[1]", box, "a photo of zwx box", "a photo of a box")]

    def seen(subject, context="beach"):
        return Verdict(subject.shape, subject.pattern, context, subject.colours, 0.5, 0.5, 0.2)

    plain = Verdict("ball", "solid", "beach", ("red",), 0.5, 0.5, 0.2)
    verdicts = {"concepts[0]": [seen(ball), seen(ball), seen(ball), seen(box)],  # one bleed of the box
                "concepts[1]": [seen(box, "snow"), plain, seen(box), seen(box)],
                "a photo of a ball": [plain, seen(ball), plain, plain], "a photo of a box": [plain] * 4}
    table = bleed_table(concepts, verdicts, contexts=("beach", "snow"), seeds=2)
    first, second = table["concepts"]
    assert (first["subject_fidelity"], first["shows_other_subjects"]) == (0.75, {"concepts[1]": 0.25})
    assert (second["subject_fidelity"], second["context_fidelity"]) == (0.75, 0.25)  # asked: beach, beach, snow, snow
    assert (first["bleed"], second["bleed"]) == (0.0, 0.25)  # the box showed on the ball's prompt
    assert [entry["any_subject"] for entry in table["class_prompts"]] == [0.25, 0.0]
    assert table["worst"] == {"subject_fidelity": 0.75, "bleed": 0.25, "class_any_subject": 0.25}


def test_evaluate_of_a_concepts_run_off_the_toy_model_says_how_to_score_one_concept(tmp_path, two_subjects, capsys):
    from helpers import run_cli

    toy, box = two_subjects
    config = config_of(tmp_path, concepts=two_concepts(toy, box), prior={"enabled": False},
                       train={**FAST["train"], "max_steps": 1})
    output_dir = run.train_from_config(config, progress=False)
    code, _, err = run_cli(["evaluate", "--adapter", output_dir / "adapter"], capsys)
    assert code != 0 and "scores per concept need the toy model's judge" in err and "--instance-dir" in err
    code, _, err = run_cli(["evaluate", "--run", output_dir], capsys)
    assert code != 0 and "trained several concepts" in err


def test_the_docs_concepts_examples_are_valid_configs():
    from helpers import doc_code_blocks

    blocks = [yaml.safe_load(code) for path, code in doc_code_blocks("yaml") if path.name == "data.md"
              and ("concepts:" in code or "instance_dir: ./photos\n" in code)]
    assert len(blocks) == 2
    listed, kohya = (config_from_mapping(block, "docs/data.md") for block in blocks)
    assert [concept.class_prompt for concept in listed.concepts] == ["a photo of a woman", "a photo of a dog",
                                                                     "a photo of a dog"]
    assert kohya.data.instance_prompt is None and not kohya.concepts


def test_the_toy_two_concept_config_trains_and_evaluate_reports_per_concept(tmp_path, capsys):
    from helpers import REPO, run_cli

    config = load_config(REPO / "configs" / "two-concepts.yaml", [
        f"output.dir={tmp_path / 'run'}", f"prior.class_dir={tmp_path / 'class'}", "prior.num_class_images=2",
        "prior.generation_steps=2", "train.max_steps=2", "validation.steps=2", "validation.num_images=1"])
    output_dir = run.train_from_config(config, progress=False)
    assert sorted(path.name for path in (tmp_path / "class").iterdir()) == ["a_photo_of_a_ball", "a_photo_of_a_box"]
    out = tmp_path / "evaluation.json"
    code, stdout, err = run_cli(["evaluate", "--adapter", output_dir / "adapter", "--seeds", "2", "--class-seeds", "1",
                                 "--steps", "2", "--context", "beach", "--out", out], capsys)
    assert code == 0, err
    assert "concepts[0] (striped_ball, 'a photo of sks ball'): subject_fidelity" in stdout
    assert "class prompt 'a photo of a box': shows a concept's subject" in stdout
    result = json.loads(out.read_text())
    assert [concept["subject"] for concept in result["concepts"]] == ["striped_ball", "checked_box"]
    assert set(result["worst"]) == {"subject_fidelity", "bleed", "class_any_subject"} and "base" in result


def test_params_counts_the_concepts_validation_prompts_as_validation_sampling(capsys):
    """The concepts' validation_prompts are grid rows the run draws, so the memory estimate has a sampling phase even
    when validation.prompts itself is empty."""
    from helpers import run_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "two-concepts.yaml"
    code, out, err = run_cli(["params", "--config", config, "--set", "validation.prompts=[]"], capsys)
    assert code == 0, err
    assert "validation sampling" in out, out
    code, out, err = run_cli(["params", "--config", config, "--set", "validation.prompts=[]", "--set",
                              "validation.every=0"], capsys)
    assert code == 0 and "validation sampling" in out  # the final grid is drawn whatever `every` says

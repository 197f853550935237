"""The toy world: a deterministic renderer, the committed pretrained model and judge, and a run that learns.

The learning test is the one that matters: after a short WaveFT run on a novel subject, the adapter's samples must
look like that subject (the judge's DINO-style similarity) far more than the base model's, for the same prompts and
seeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import run_cli

from waveft_train.models.builtin import toy_model_dir
from waveft_train.toy.subjects import DEMO_SUBJECT, SUBJECTS, get_subject, write_instance_photos
from waveft_train.toy.world import (
    CONTEXTS,
    HELD_OUT_COMBINATIONS,
    PATTERNS,
    RESERVED_LOOKS,
    caption,
    render,
    sample_scene,
    vocabulary,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
DEMO_SUBJECT_DIR = REPO / "configs" / "demo_subject"


# ----------------------------------------------------------------------------------------------- the world
def test_renderer_is_deterministic_from_the_seed():
    first = [render(sample_scene(np.random.default_rng([3, i]))) for i in range(6)]
    again = [render(sample_scene(np.random.default_rng([3, i]))) for i in range(6)]
    other = [render(sample_scene(np.random.default_rng([4, i]))) for i in range(6)]
    assert all(a.shape == (64, 64, 3) and a.dtype == np.uint8 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))


def test_pretraining_holds_out_the_subjects_looks_and_the_combinations():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, pretraining=True) for _ in range(400)]  # the solid phases' data
    assert all(s.pattern == "solid" and len(s.colours) == 1 and s.in_pretraining for s in scenes)
    assert not any((s.shape, s.colours[0], s.context) in HELD_OUT_COMBINATIONS for s in scenes)
    world = [sample_scene(rng) for _ in range(400)]
    assert {s.pattern for s in world} == set(PATTERNS)  # the rest of the world has them (the judge learns them)
    assert all(len(s.colours) == 2 and s.colours[0] != s.colours[1] for s in world if s.pattern != "solid")
    # The pattern phase sees patterned objects, but never a subject's look (in either colour order, any context)
    # nor a held-out combination through either of its colours.
    patterned = [s for s in world if s.pattern != "solid"]
    assert 0 < sum(s.in_pretraining for s in patterned) < len(patterned)
    for subject in SUBJECTS.values():
        assert subject.look in RESERVED_LOOKS
        for colours in (subject.colours, subject.colours[::-1]):
            look_alike = sample_scene(rng, shape=subject.shape, pattern=subject.pattern, colours=colours)
            assert not look_alike.in_pretraining
    shape, colour, context = HELD_OUT_COMBINATIONS[0]
    other = next(name for name in ("red", "blue") if name != colour)
    assert not sample_scene(rng, shape=shape, pattern="dots", colours=(other, colour), context=context).in_pretraining


def test_pattern_phase_data():
    """scripts/pretrain_toy.py: which scenes the pattern phase adds, its phase checks, and the manifest's command."""
    from scripts import pretrain_toy as script

    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng, pretraining=i < 50) for i in range(300)]
    rows = script.pattern_phase_scenes(scenes, 50)
    assert rows and min(rows) >= 50
    assert all(scenes[i].pattern != "solid" and scenes[i].in_pretraining for i in rows)
    assert len(rows) == sum(s.pattern != "solid" and s.in_pretraining for s in scenes[50:])
    assert script.parse_args(["--denoiser-steps", "10", "20", "--pattern-steps", "30"]).pattern_steps == [30]
    assert script.parse_args(["--pattern-steps"]).pattern_steps == []  # a model that never sees a pattern
    continued = script.parse_args(["--init-from", "prev", "--denoiser-steps", "--pattern-steps", "2000"])
    assert (continued.init_from, continued.denoiser_steps, continued.pattern_steps) == (Path("prev"), [], [2000])
    with pytest.raises(SystemExit):  # no phase at all
        script.parse_args(["--denoiser-steps", "--pattern-steps"])
    with pytest.raises(SystemExit):
        script.parse_args(["--denoiser-steps", "10", "20", "--pattern-steps", "15"])
    assert script.reproducing(["--threads", "2", "--work", "/tmp/w", "--out=/tmp/o", "--no-progress"]) == [
        "--threads", "2"]
    assert script.reproducing(["--fresh", "--seed", "1"]) == ["--seed", "1"]  # as "settings" leaves out `fresh`
    assert {"--" + name.replace("_", "-") for name in vars(script.parse_args([]))} >= set(script.UNRECORDED)


def test_captions_use_only_words_the_tokenizer_knows():
    scene = sample_scene(np.random.default_rng(1), shape="ball", colours=("red",), pattern="solid", context="beach")
    assert caption(scene) == "a photo of a red ball on the beach"
    assert caption(scene, colour=False, context=False) == "a photo of a ball"
    assert caption(scene, identifier=True) == "a photo of sks ball on the beach"
    striped = sample_scene(np.random.default_rng(1), shape="box", colours=("green", "blue"), pattern="stripes",
                           context="snow")
    assert caption(striped) == "a photo of a striped green and blue box in the snow"
    assert caption(striped, colour=False) == "a photo of a box in the snow"
    subject = SUBJECTS[DEMO_SUBJECT]
    for text in (caption(scene), caption(striped), subject.prompt("night"), subject.class_prompt,
                 subject.instance_prompt):
        assert set(text.split()) <= set(vocabulary())


def test_demo_subject_photos_are_the_rendered_subject(tmp_path):
    written = write_instance_photos(SUBJECTS[DEMO_SUBJECT], tmp_path)
    assert [p.name for p in written] == sorted(p.name for p in DEMO_SUBJECT_DIR.glob("*.png"))
    for path in written:
        assert path.read_bytes() == (DEMO_SUBJECT_DIR / path.name).read_bytes()
    assert (tmp_path / "metadata.jsonl").read_bytes() == (DEMO_SUBJECT_DIR / "metadata.jsonl").read_bytes()
    assert get_subject(DEMO_SUBJECT_DIR) == SUBJECTS[DEMO_SUBJECT]
    assert len(SUBJECTS) >= 5 and all(s.pattern != "solid" for s in SUBJECTS.values())


def test_demo_captions_name_the_context_each_photo_shows():
    """The demo trains on per-photo captions (data.caption_column): each must name the context the judge sees in its
    photo, in the words the evaluation asks with, and the trainer's own loader must pick them up."""
    from waveft_train.config import load_config
    from waveft_train.data.images import load_images
    from waveft_train.toy.judge import judge_images, load_judge

    config = load_config(DEMO)
    images = load_images(config.data.instance_dir, caption_column=config.data.caption_column,
                         default_prompt=config.data.instance_prompt)
    verdicts = judge_images(load_judge(), [np.asarray(images.image(i).convert("RGB")) for i in range(len(images))])
    subject = SUBJECTS[DEMO_SUBJECT]
    assert list(images.prompts) == [subject.prompt(v.context) for v in verdicts]
    assert len({v.context for v in verdicts}) >= 3  # the captions differ: a bare instance prompt would not pass


def test_importing_the_package_is_cheap():
    import subprocess
    import sys

    code = "import sys, waveft_train.toy, waveft_train.toy.world, waveft_train.toy.subjects; " \
           "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------- the committed model
def test_manifest_hashes_match_the_committed_files():
    folder = toy_model_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert sum((folder / name).stat().st_size for name in on_disk) <= 20 * 1024 * 1024
    assert manifest["command"].startswith("python -m scripts.pretrain_toy") and manifest["version"] >= 1 and "seed" in manifest
    weights = [name for name in on_disk if name.endswith(".safetensors")]
    assert len(weights) == 5 and not [n for n in on_disk if n.endswith((".bin", ".pt", ".ckpt", ".pkl"))]


def test_toy_loads_through_from_pretrained_like_a_hub_model():
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from waveft_train.models.loading import load_components
    from waveft_train.models.sources import resolve_pretrained

    folder = toy_model_dir()
    assert resolve_pretrained("toy") == str(folder)
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.float16  # fp16 on disk
    pipeline = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert pipeline.unet.config.cross_attention_dim == (pipeline.text_encoder.config.hidden_size
                                                        + pipeline.text_encoder_2.config.hidden_size)
    components = load_components("toy")  # the trainer's path: frozen, fp32 as asked
    assert components.base_model_name == "toy" and components.model_path == str(folder)
    assert components.unet.dtype == torch.float32 and not any(p.requires_grad for p in components.unet.parameters())
    # Every stored weight arrives, on every supported transformers/diffusers release (transformers 4.x once
    # initialized an unprefixed text encoder at random, with only a warning).
    for name, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"), ("text_encoder_2", "model")):
        loaded = {key.removeprefix("text_model."): value for key, value in getattr(components, name).state_dict().items()}
        with safe_open(str(folder / name / f"{file}.safetensors"), framework="pt") as weights:
            for key in weights.keys():
                stored = weights.get_tensor(key)
                assert torch.equal(loaded[key.removeprefix("text_model.")].to(stored.dtype), stored), (name, key)
    text = "a photo of sks ball on the beach"  # every word of the world is one token, in both tokenizers
    ids = components.tokenizer(text).input_ids
    assert len(ids) == len(text.split()) + 2 and components.tokenizer_2(text).input_ids == ids


def test_config_keeps_toy_as_a_name(tmp_path):
    from waveft_train.config import load_config

    config = load_config(DEMO, [f"output.dir={tmp_path / 'out'}", f"prior.class_dir={tmp_path / 'class'}"])
    assert config.model.pretrained == "toy"


def test_judge_reads_rendered_scenes():
    from waveft_train.toy.judge import judge_images, load_judge

    rng = np.random.default_rng(12345)
    scenes = [sample_scene(rng) for _ in range(96)]
    verdicts = judge_images(load_judge(), [render(s) for s in scenes])
    for head in ("shape", "pattern", "context"):
        assert np.mean([getattr(v, head) == getattr(s, head) for v, s in zip(verdicts, scenes)]) >= 0.9, head
    assert np.mean([set(v.colours) == set(s.colours) for v, s in zip(verdicts, scenes)]) >= 0.9


def test_object_coverage_is_the_object_and_recolouring_keeps_it():
    from scripts.toy_pretraining import recolour_backgrounds
    from waveft_train.toy.world import object_coverage

    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, shape=shape, context=context) for shape in ("ball", "box", "cone")
              for context in CONTEXTS]
    images = np.stack([render(scene) for scene in scenes])
    recoloured = recolour_backgrounds(images, scenes, seed=0)
    for scene, image, new in zip(scenes, images, recoloured):
        cover = object_coverage(scene)
        assert cover.min() >= 0.0 and cover.max() == 1.0 and cover[0, 0] == cover[-1, -1] == 0.0
        opaque = cover == 1.0
        assert np.array_equal(new[opaque], image[opaque])  # the object's pixels are untouched
        assert np.abs(new[cover == 0.0].astype(int) - image[cover == 0.0]).mean() > 5  # the background is not
    ball = scenes[0]
    area = object_coverage(ball).sum() / 64**2
    assert area == pytest.approx(np.pi * ball.size**2, rel=0.15)  # a disc of radius `size`


def test_judge_reads_the_shape_whatever_colour_the_sky():
    """The model paints skies the world never has (purple nights); the judge must still read the object. The judge
    trained without recoloured backgrounds read a striped ball before a flat purple sky as a box in 32 of 32."""
    from waveft_train.toy.judge import judge_images, load_judge
    from waveft_train.toy.world import object_coverage

    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng, shape=shape, context="night") for shape in ("ball", "box", "cone") for _ in range(8)]
    skies = (np.array([0.45, 0.25, 0.75]), np.array([0.2, 0.25, 0.7]), np.array([0.85, 0.55, 0.3]))
    images = []
    for index, scene in enumerate(scenes):
        cover = object_coverage(scene)[..., None]
        sky = skies[index % len(skies)] * 255
        images.append(np.round(cover * render(scene) + (1 - cover) * sky).astype(np.uint8))
    verdicts = judge_images(load_judge(), images)
    assert np.mean([v.shape == s.shape for v, s in zip(verdicts, scenes)]) >= 0.9
    assert np.mean([v.pattern == s.pattern and set(v.colours) == set(s.colours)
                    for v, s in zip(verdicts, scenes)]) >= 0.9


def test_the_model_follows_held_out_prompt_combinations():
    """The pretrained model composes: for (shape, colour, context) combinations it never saw together, the judge
    reads the asked shape, colour and context each in at least 80 % of its samples (48 samples; manifest.json records
    the reading on 96)."""
    from waveft_train.models.loading import build_pipeline, load_components
    from waveft_train.toy.evaluate import prompt_accuracy
    from waveft_train.toy.judge import load_judge

    pipeline = build_pipeline(load_components("toy"))
    accuracy, samples = prompt_accuracy(pipeline, load_judge(), HELD_OUT_COMBINATIONS, seeds=4, first_seed=5000)
    assert accuracy["samples"] == len(samples.images) == 4 * len(HELD_OUT_COMBINATIONS)
    for head in ("shape", "colour", "context"):
        assert accuracy[head] >= 0.8, accuracy


def test_subject_similarity_tells_the_subject_from_its_class():
    """The DINO-style score: renders of the striped ball are closer to the subject's references than solid balls are."""
    from waveft_train.toy.evaluate import similarity, subject_references
    from waveft_train.toy.judge import load_judge

    judge, subject = load_judge(), SUBJECTS[DEMO_SUBJECT]
    references = subject_references(subject, judge, ("snow",))["snow"]
    rng = np.random.default_rng(99)
    same = [render(sample_scene(rng, shape="ball", colours=subject.colours, pattern="stripes", context="snow"))
            for _ in range(8)]
    solid = [render(sample_scene(rng, shape="ball", pattern="solid", context="snow")) for _ in range(8)]
    assert 0.0 <= min(similarity(judge, solid, references)) and max(similarity(judge, same, references)) <= 1.0
    assert np.mean(similarity(judge, same, references)) >= np.mean(similarity(judge, solid, references)) + 0.2


class _Codec(torch.nn.Module):
    """A stand-in VAE with diffusers' encode/decode shapes whose round trip is `transform`."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=self.transform(latents))


def test_described_prompt_asks_for_the_look_in_pretraining_words():
    from waveft_train.models.loading import load_components

    assert SUBJECTS[DEMO_SUBJECT].described_prompt("beach") == "a photo of a striped red and yellow ball on the beach"
    tokenizer = load_components("toy").tokenizer
    for subject in SUBJECTS.values():
        for context in CONTEXTS:
            prompt = subject.described_prompt(context)
            assert subject.instance_prompt.split()[-1] in prompt.split()  # the class noun
            # Whole words the toy tokenizer knows (no pieces), so the model reads what pretraining taught it.
            assert tokenizer.tokenize(prompt) == [f"{word}</w>" for word in prompt.split()], prompt


def test_subject_fidelity_ceiling_reads_the_subject_through_the_vae():
    from waveft_train.toy.evaluate import codec_ceiling
    from waveft_train.toy.judge import load_judge

    judge, subject, contexts = load_judge(), SUBJECTS[DEMO_SUBJECT], ("beach", "night")
    # A lossless codec keeps the subject's renders, which the judge reads exactly; one that drops colour keeps none.
    assert codec_ceiling(_Codec(lambda x: x), subject, judge, contexts) == 1.0
    assert codec_ceiling(_Codec(lambda x: x.mean(dim=1, keepdim=True).expand_as(x)), subject, judge, contexts) == 0.0


# ----------------------------------------------------------------------------------------------- learning
E2E_STEPS = 100


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    """A short WaveFT run on the demo subject through the real trainer (batch 4, no prior, no validation, a checkpoint
    half way: about 20 s)."""
    from waveft_train.config import load_config
    from waveft_train.train import run

    output_dir = tmp_path_factory.mktemp("toy-run") / "run"
    overrides = {"output.dir": output_dir, "prior.enabled": False, "validation.every": 0, "validation.prompts": "[]",
                 "train.max_steps": E2E_STEPS, "train.batch_size": 4, "train.checkpoint_every": E2E_STEPS // 2,
                 "train.learning_rate": 5e-4}
    config = load_config(DEMO, [f"{key}={value}" for key, value in overrides.items()])
    return run.train_from_config(config, progress=False)


def test_a_short_run_learns_the_subject(learned_run):
    from waveft_train.toy.evaluate import EvalSettings, evaluate_adapter

    assert json.loads((learned_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "toy"
    settings = EvalSettings(contexts=("beach", "room"), seeds=4, class_seeds=2, steps=15)
    metrics = evaluate_adapter(learned_run / "adapter", settings=settings)  # the subject comes from the run's config
    assert metrics["subject"]["name"] == DEMO_SUBJECT
    assert metrics["base"]["subject_fidelity"] <= 0.15  # the base model has never seen a striped red-and-yellow ball
    # The adapter's samples look like the subject: DINO-style similarity to its renders, far above the base model's
    # (0.94 against 0.43 here, on the newest and the lowest supported library versions alike).
    assert metrics["subject_similarity"] >= metrics["base"]["subject_similarity"] + 0.3, metrics["judgements"]
    # And the judge reads many of them as exactly the subject (5 of 8 here, against none for the base model; the
    # misses read orange where red belongs).
    assert metrics["subject_fidelity"] >= metrics["base"]["subject_fidelity"] + 0.375, metrics["judgements"]
    for key in ("subject_similarity", "subject_fidelity", "context_fidelity", "prior_preservation", "diversity",
                "subject_fidelity_ceiling", "described_subject_fidelity", "class_colour_similarity"):
        assert 0.0 <= metrics[key] <= 1.0
    # Asked for the look in words, the base model draws it at times; asked for "sks ball", never.
    assert metrics["described_subject_fidelity"] > metrics["base"]["subject_fidelity"]


def test_evaluate_command_writes_the_metrics(learned_run, tmp_path, capsys):
    from waveft_train.cli import main as cli

    out = tmp_path / "metrics.json"
    args = ["evaluate", "--adapter", learned_run / "adapter", "--out", out, "--seeds", "2", "--class-seeds", "1",
            "--steps", "4", "--first-seed", "3000", "--subject", str(DEMO_SUBJECT_DIR)]
    try:
        cli.main([str(arg) for arg in args])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    metrics = json.loads(out.read_text())
    assert {"subject_fidelity", "context_fidelity", "prior_preservation", "diversity", "base", "sampled",
            "subject_fidelity_ceiling", "described_subject_fidelity"} <= set(metrics)
    assert metrics["sampled"]["steps"] == 4 and len(metrics["sampled"]["subject_prompts"]) == 4
    assert metrics["sampled"]["seeds"] == [3000, 3001] and metrics["sampled"]["class_seeds"] == [3000]
    printed = capsys.readouterr().out
    assert f"VAE ceiling {metrics['subject_fidelity_ceiling']:.2f}" in printed
    assert f"described in words {metrics['described_subject_fidelity']:.2f}" in printed
    try:  # --json prints what --out writes (the same seeds give the same samples)
        cli.main([str(arg) for arg in args if arg not in ("--out", out)] + ["--json"])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    assert json.loads(capsys.readouterr().out) == metrics


def test_evaluate_refuses_adapters_of_other_models_and_unknown_subjects(learned_run, tmp_path, capsys):
    from waveft_train.cli import main as cli

    adapter = tmp_path / "adapter"
    shutil.copytree(learned_run / "adapter", adapter)
    for args, fragment in (
        (["--subject", "no_such_subject"], "neither a built-in subject"),
        (["--base", "tiny"], "--instance-dir"),  # not the toy model: DINO/CLIP, which need the photos and prompts
        (["--out", tmp_path / "metrics.txt"], "must end with .json"),
        ([], "Cannot tell which subject"),  # a copied adapter has no run config.yaml beside it
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", "--adapter", str(adapter), *[str(arg) for arg in args]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err, err


def test_evaluate_run_ranks_the_checkpoints_of_a_toy_run(learned_run, tmp_path, capsys):
    """`evaluate --run outputs/demo` on the CI's toy run: every checkpoint judged, ranked, the best named."""
    run_dir = tmp_path / "run"  # evaluate writes evaluation.json(l) into the run folder
    shutil.copytree(learned_run, run_dir)
    code, out, err = run_cli(["evaluate", "--run", run_dir, "--seeds", 2, "--class-seeds", 2, "--steps", 4], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "evaluation.jsonl").read_text().splitlines()]
    assert [(r["step"], r["checkpoint"]) for r in records] == [(E2E_STEPS // 2, "checkpoints/step-000050"),
                                                               (E2E_STEPS, "adapter")]
    summary = json.loads((run_dir / "evaluation.json").read_text())
    assert summary["settings"]["metrics"] == "toy judge" and summary["settings"]["subject"] == DEMO_SUBJECT
    assert summary["best"]["score"] == max(r["score"] for r in records)
    assert f"Best: {summary['best']['checkpoint']}" in out
    for record in records:
        scores = record["scores"]
        assert scores["prompt_fidelity"] == scores["context_fidelity"]
        assert 0 <= scores["class_colour_similarity"] <= 1 and 0 <= scores["base_class_colour_similarity"] <= 1
        assert scores["subject_gain"] == pytest.approx(scores["subject_similarity"] - scores["base_subject_similarity"])

"""Pretrain the toy SDXL pipeline and its judge on the toy world; write them as package data.

    python -m scripts.pretrain_toy --threads 2    # from scratch, seed 0: 63 min on a 2-core CPU

Writes waveft_train/assets/toy/ (a diffusers StableDiffusionXLPipeline folder in fp16 safetensors, judge/ beside
it) and manifest.json (sha256 of every file, this command, seed, wall time per stage, library versions, the judge's
held-out accuracy and the model's accuracy on held-out prompt combinations). Each stage's result is cached under
--work, so an interrupted run continues at the stage it was in (the stage itself restarts, except the denoiser,
which resumes from its last saved step); --fresh starts over. The denoiser trains in phases (--denoiser-steps
2500 3500 6000): each longer phase, measured, made the samples follow their prompts better. Those phases see solid
objects only; the pattern phases (--pattern-steps 9000 13000) then add the world's patterned objects with their words
("a photo of a striped green and blue box"), all but the subjects' looks (world.RESERVED_LOOKS), each three times,
a third of every batch: DreamBooth's subjects are new combinations of what the model knows, not new kinds of things.
Shorter runs compose worse (docs/toy-world.md). --init-from continues a released model instead of starting from
random weights: its VAE is kept (same latents, same scale), the phases start from its UNet and text encoders.
Each retrain bumps the manifest's version (docs/toy-world.md says when a retrain may be committed).

Reproducible from the seed on one machine (CPU float reductions may differ across machines).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scripts import toy_pretraining as pretraining
from scripts.toy_release import write_release
from waveft_train.models import architecture
from waveft_train.models.builtin import toy_model_dir
from waveft_train.models.tokenizer import build_tokenizer
from waveft_train.toy.judge import round_trip
from waveft_train.toy.world import COLOURS, CONTEXTS, HELD_OUT_COMBINATIONS, SHAPES, Scene, vocabulary

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=toy_model_dir(), help="pipeline folder to write (%(default)s)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "toy-pretrain", help="stage cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--images", type=int, default=24000, help="rendered scenes in all")
    parser.add_argument("--pretraining-images", type=int, default=16000, help="of which pretraining scenes")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="a toy pipeline folder to continue from: its VAE is kept (no VAE training, same latent "
                             "scale) and the denoiser's phases start from its UNet and text encoders")
    parser.add_argument("--denoiser-steps", type=int, nargs="*", default=[2500, 3500, 6000],
                        help="phase ends: each phase resumes the last and runs its own cosine schedule (0..end) "
                             "from there, a warm restart (default: %(default)s)")
    parser.add_argument("--pattern-steps", type=int, nargs="*", default=[9000, 13000],
                        help="phase ends after --denoiser-steps whose data add the patterned scenes (default: "
                             "%(default)s; none: a model that has never seen a pattern)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--judge-round-trips", type=int, default=4000, help="VAE round trips the judge also sees")
    parser.add_argument("--judge-regenerations", type=int, default=1536,
                        help="solid renders the model redraws for the judge")
    parser.add_argument("--judge-recoloured", type=int, default=6000,
                        help="renders whose background is recoloured for the judge (its shape reading must not "
                             "depend on the sky's colour)")
    parser.add_argument("--eval-seeds", type=int, default=8, help="samples per held-out prompt combination")
    parser.add_argument("--fresh", action="store_true", help="discard cached stages under --work")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    ends = args.denoiser_steps + args.pattern_steps
    if not ends or ends[0] < 1 or any(b <= a for a, b in itertools.pairwise(ends)):
        parser.error(f"--denoiser-steps and then --pattern-steps: phase ends must be positive and increasing, got "
                     f"{args.denoiser_steps} and {args.pattern_steps}")
    return args


class Stages:
    """Runs each stage once; its result and wall time are kept under the work folder."""

    def __init__(self, work: Path):
        self.work = work
        self.times_file = work / "stage_seconds.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}

    def done(self, name: str) -> bool:
        return name in self.times

    def finish(self, name: str, started: float) -> None:
        self.times[name] = round(time.perf_counter() - started, 1)
        self.times_file.write_text(json.dumps(self.times, indent=2))
        print(f"stage {name}: {self.times[name]:.0f} s", flush=True)


def stage_render(args, stages: Stages):
    path = args.work / "images.npy"
    if not stages.done("render"):
        started = time.perf_counter()
        images, _ = pretraining.render_dataset(args.images, args.pretraining_images, args.seed,
                                               workers=args.threads or 1, progress=not args.no_progress)
        np.save(path, images)
        stages.finish("render", started)
    scenes = [pretraining.dataset_scene(args.seed, i, i < args.pretraining_images) for i in range(args.images)]
    return np.load(path), scenes


def stage_vae(args, stages: Stages, images: np.ndarray, scenes: list[Scene]):
    from diffusers import AutoencoderKL

    folder = args.work / "vae"
    if not stages.done("vae"):
        started = time.perf_counter()
        if args.init_from is not None:  # the continued UNet expects this VAE's latents at this VAE's scale
            vae = AutoencoderKL.from_pretrained(args.init_from / "vae", torch_dtype=torch.float32).eval()
        else:
            torch.manual_seed(args.seed + 1)
            vae = architecture.build_vae(architecture.TOY)
            pretraining.train_vae(vae, images, scenes, steps=args.vae_steps, batch_size=16, seed=args.seed + 1,
                                  progress=not args.no_progress)
        latents = pretraining.encode(vae, images, progress=not args.no_progress)  # all: the pattern phases use the rest
        if args.init_from is None:
            vae.register_to_config(scaling_factor=round(float(1.0 / latents[: args.pretraining_images].std()), 5))
        vae.save_pretrained(folder)
        torch.save(latents, args.work / "latents.pt")
        stages.finish("vae", started)
    vae = AutoencoderKL.from_pretrained(folder).eval()
    return vae, torch.load(args.work / "latents.pt") * vae.config.scaling_factor


def stage_denoiser(args, stages: Stages, latents: torch.Tensor, scenes: list[Scene]):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = args.work / "denoiser"
    tokenizer = build_tokenizer(vocabulary())
    if not stages.done("denoiser"):
        started = time.perf_counter()
        torch.manual_seed(args.seed + 2)
        if args.init_from is not None:
            unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet", torch_dtype=torch.float32)
            text_encoder = CLIPTextModel.from_pretrained(args.init_from / "text_encoder", torch_dtype=torch.float32)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(args.init_from / "text_encoder_2",
                                                                         torch_dtype=torch.float32)
        else:
            text_encoder = architecture.build_text_encoder(architecture.TOY, tokenizer, second=False)
            text_encoder_2 = architecture.build_text_encoder(architecture.TOY, tokenizer, second=True)
            unet = architecture.build_unet(architecture.TOY)
        noise_scheduler = DDPMScheduler.from_config(architecture.build_scheduler().config)
        solid = list(range(args.pretraining_images))
        with_patterns = solid + pattern_phase_scenes(scenes, args.pretraining_images) * PATTERN_REPEATS
        phases = [(end, solid) for end in args.denoiser_steps] + [(end, with_patterns) for end in args.pattern_steps]
        for end, rows in phases:
            trained, losses = pretraining.train_denoiser(
                unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                noise_scheduler=noise_scheduler, latents=latents[rows], scenes=[scenes[i] for i in rows],
                steps=end, batch_size=args.batch_size, seed=args.seed + 2, lr=args.lr,
                progress=not args.no_progress, resume=args.work / "denoiser_state.pt")
        for name, module in trained.items():
            module.save_pretrained(folder / name)
        (args.work / "denoiser_losses.json").write_text(json.dumps([round(x, 5) for x in losses]))
        stages.finish("denoiser", started)
    return {
        "tokenizer": tokenizer,
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval(),
    }


PATTERN_REPEATS = 3  # the pattern phase's 2 645 patterned scenes come thrice: a third of each batch


def pattern_phase_scenes(scenes: list[Scene], first: int) -> list[int]:
    """Indices (from `first`: the scenes of the whole world) of the patterned scenes the pattern phase adds: all but
    the subjects' looks and the held-out combinations (`Scene.in_pretraining`)."""
    return [i for i in range(first, len(scenes)) if scenes[i].pattern != "solid" and scenes[i].in_pretraining]


def regeneration_set(scenes: list[Scene], count: int, seed: int) -> np.ndarray:
    """Indices of `count` solid scenes (pretraining.regenerate redraws solid scenes only)."""
    solid = [i for i, scene in enumerate(scenes) if scene.pattern == "solid"]
    return np.random.default_rng(seed).choice(solid, size=count, replace=False)


def stage_regenerate(args, stages: Stages, images: np.ndarray, scenes: list[Scene], pipeline):
    """Renders redrawn by the model (pretraining.regenerate): the judge's view of what samples look like."""
    path = args.work / "regenerated.npz"
    if not stages.done("regenerate"):
        started = time.perf_counter()
        chosen = regeneration_set(scenes[: args.pretraining_images], args.judge_regenerations, args.seed + 4)
        train = pretraining.regenerate(pipeline, images[chosen], [scenes[i] for i in chosen], seed=args.seed + 4,
                                       progress=not args.no_progress)
        test_images, test_scenes = pretraining.render_dataset(2000, 2000, args.seed + 1001, progress=False)
        test_chosen = regeneration_set(test_scenes, 256, args.seed + 5)
        test = pretraining.regenerate(pipeline, test_images[test_chosen], [test_scenes[i] for i in test_chosen],
                                      seed=args.seed + 5, progress=not args.no_progress)
        np.savez(path, chosen=chosen, images=train, test_chosen=test_chosen, test_images=test)
        stages.finish("regenerate", started)
    saved = np.load(path)
    test_scenes = [pretraining.dataset_scene(args.seed + 1001, i, True) for i in saved["test_chosen"]]
    return saved["chosen"], saved["images"], saved["test_images"], test_scenes


def stage_judge(args, stages: Stages, images: np.ndarray, scenes: list[Scene], vae, regenerated):
    """The judge learns from renders, from VAE round trips of renders (every generated image is decoded by that VAE,
    which softens patterns), from solid renders the model redrew (four times over: they look like what it will
    read), so it reads the model's samples as well as crisp scenes, and from renders with recoloured backgrounds
    (their context label ignored), so that a sky the world never has does not change the shape it reads."""
    from waveft_train.toy.judge import Judge

    path = args.work / "judge.pt"
    regen_chosen, regen_images, regen_test, regen_test_scenes = regenerated
    if not stages.done("judge"):
        started = time.perf_counter()
        rng = np.random.default_rng(args.seed + 3)
        chosen = np.sort(rng.choice(len(images), size=min(args.judge_round_trips, len(images)), replace=False))
        round_trips = round_trip(vae, images[chosen], progress=not args.no_progress)
        torch.manual_seed(args.seed + 3)
        judge = Judge()
        regen_scenes = [scenes[i] for i in regen_chosen]
        recoloured_chosen = np.sort(rng.choice(len(images), size=min(args.judge_recoloured, len(images)),
                                               replace=False))
        recoloured_scenes = [scenes[i] for i in recoloured_chosen]
        recoloured = pretraining.recolour_backgrounds(images[recoloured_chosen], recoloured_scenes, seed=args.seed + 8)
        train_images = np.concatenate([images, round_trips, *[regen_images] * 4, recoloured])
        train_scenes = scenes + [scenes[i] for i in chosen] + regen_scenes * 4 + recoloured_scenes
        context_known = [True] * (len(train_scenes) - len(recoloured_scenes)) + [False] * len(recoloured_scenes)
        pretraining.train_judge(judge, train_images, train_scenes, steps=args.judge_steps, batch_size=64,
                                seed=args.seed + 3, context_known=context_known, progress=not args.no_progress)
        torch.save(judge.state_dict(), path)
        test_images, test_scenes = pretraining.render_dataset(2000, 0, args.seed + 1000, workers=args.threads or 1,
                                                              progress=False)
        accuracy = pretraining.judge_accuracy(judge, test_images, test_scenes)
        accuracy["vae_round_trip"] = pretraining.judge_accuracy(
            judge, round_trip(vae, test_images[:500], progress=False), test_scenes[:500])
        accuracy["regenerated"] = pretraining.judge_accuracy(judge, regen_test, regen_test_scenes)
        # Context is meaningless here; shape, colours and pattern must not move with the background.
        accuracy["recoloured_background"] = pretraining.judge_accuracy(
            judge, pretraining.recolour_backgrounds(test_images[:500], test_scenes[:500], seed=args.seed + 9),
            test_scenes[:500])
        (args.work / "judge_accuracy.json").write_text(json.dumps(accuracy, indent=2))
        stages.finish("judge", started)
    judge = Judge()
    judge.load_state_dict(torch.load(path))
    return judge.eval(), json.loads((args.work / "judge_accuracy.json").read_text())


def seen_combinations(count: int) -> list[tuple[str, str, str]]:
    every = [(s, c, k) for s in SHAPES for c in COLOURS for k in CONTEXTS]
    seen = [combo for combo in every if combo not in HELD_OUT_COMBINATIONS]
    return [seen[i] for i in np.random.default_rng(7).choice(len(seen), size=count, replace=False)]


def stage_eval(args, stages: Stages, pipeline, judge):
    from waveft_train.adapter.sampling import make_grid
    from waveft_train.toy.evaluate import prompt_accuracy

    path = args.work / "prompt_accuracy.json"
    if not stages.done("eval"):
        started = time.perf_counter()
        held_out, samples = prompt_accuracy(pipeline, judge, HELD_OUT_COMBINATIONS, args.eval_seeds, 5000)
        seen, _ = prompt_accuracy(pipeline, judge, seen_combinations(12), args.eval_seeds, 5000)
        path.write_text(json.dumps({"held_out_combinations": held_out, "seen_combinations": seen}, indent=2))
        from PIL import Image

        tiles = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                 for image in samples.images]
        rows = [tiles[i:i + args.eval_seeds] for i in range(0, len(tiles), args.eval_seeds)]
        make_grid(rows).save(args.work / "held_out_samples.png")
        stages.finish("eval", started)
    return json.loads(path.read_text())


# Options that do not change what gets written, only where and how (value: whether the option takes a value). The
# manifest records neither them in "settings" nor them in "command".
UNRECORDED = {"--out": True, "--work": True, "--fresh": False, "--no-progress": False}


def reproducing(argv: list[str]) -> list[str]:
    """argv without the UNRECORDED options (and their values)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in UNRECORDED:
            skip = UNRECORDED[arg]
        elif arg.split("=", 1)[0] not in UNRECORDED:
            kept.append(arg)
    return kept


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.work)
    images, scenes = stage_render(args, stages)
    vae, latents = stage_vae(args, stages, images, scenes)
    denoiser = stage_denoiser(args, stages, latents, scenes)
    pipeline = architecture.assemble_pipeline(vae=vae, scheduler=architecture.build_scheduler(), **denoiser)
    pipeline.set_progress_bar_config(disable=True)
    regenerated = stage_regenerate(args, stages, images, scenes, pipeline)
    judge, judge_accuracy = stage_judge(args, stages, images, scenes, vae, regenerated)
    accuracy = stage_eval(args, stages, pipeline, judge)
    print(json.dumps({"judge": judge_accuracy, **accuracy}, indent=2))
    write_release(args.out, vae=vae, denoiser=denoiser, judge=judge, judge_accuracy=judge_accuracy,
                  prompt_accuracy=accuracy, seed=args.seed, stage_seconds=stages.times,
                  command="python -m scripts.pretrain_toy" + "".join(" " + shlex.quote(a) for a in reproducing(argv)),
                  settings={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                            if "--" + key.replace("_", "-") not in UNRECORDED})


if __name__ == "__main__":
    main()

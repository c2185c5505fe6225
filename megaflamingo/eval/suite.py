"""A suite run: model and data from a config, a checkpoint and a data spec; tasks x shots x trials.

The data spec is a YAML (or JSON) file naming each task's files (keys in `tasks.py`), paths
relative to the spec's folder:

    coco: {karpathy: coco/dataset_coco.json, images: coco/images, annotations: coco/captions_val2014.json}
    vqav2: {train_questions: ..., train_annotations: ..., train_images: .../train2014,
            test_questions: ..., test_annotations: ..., test_images: .../val2014}
    hatefulmemes: {train: hm/train.jsonl, test: hm/dev.jsonl, images: hm/img}
    easyvqa: {test: vqa/test.jsonl}
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from megaflamingo.eval.cache import CachedDecoder
from megaflamingo.eval.generation import UncachedDecoder
from megaflamingo.eval.report import markdown_table, summarize
from megaflamingo.eval.runner import Evaluator, Ranks, TrialSettings, run_trial
from megaflamingo.eval.tasks import TASKS, load_task_data


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names, validated. Raises ValueError with the known names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task {unknown[0] if unknown else text!r}; known: {', '.join(TASKS)}")
    return names


def read_data_spec(path: str | Path) -> tuple[dict, Path]:
    """(spec dict, base folder). Raises FileNotFoundError / ValueError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data spec not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping of task name -> files")
    return spec, path.resolve().parent


def resolve_checkpoint(cfg, checkpoint: str) -> Path | None:
    """`auto` -> the newest checkpoint under train.output_dir, `none` -> None (weights from the
    config only), else the given directory.

    Raises:
        ValueError: no checkpoint found, or a Hugging Face export directory (not loadable yet).
    """
    from megaflamingo.training.checkpoint import latest_checkpoint

    if checkpoint == "none":
        return None
    if checkpoint == "auto":
        found = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
        if found is None:
            raise ValueError(f"no checkpoint under {cfg.train.output_dir}")
        return found
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        raise ValueError(f"{path} is a Hugging Face export; loading one for evaluation is not supported yet "
                         "(evaluate the training checkpoint it came from)")
    if not path.is_dir():
        raise ValueError(f"checkpoint directory not found: {path}")
    return path


def build_evaluator(cfg, checkpoint: Path | None, device: torch.device, seed: int | None = None,
                    kv_cache: bool = True) -> Evaluator:
    """The config's model with the checkpoint's trainable weights, its tokenizer and transform.

    Weights that neither the config's sources nor the checkpoint provide (a random tower or LM in
    tests) are drawn from `seed`, by default the config's train.seed: the frozen weights the
    training run started from (and kept), on every rank and in every run.
    """
    from megaflamingo.data.images import build_image_transform
    from megaflamingo.data.tokenizer import load_tokenizer
    from megaflamingo import build_model
    from megaflamingo.training.checkpoint import load_trainable_weights

    tokenizer, ids = load_tokenizer(cfg.model.tokenizer)
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_model(cfg.model, seed=seed).eval()
    if checkpoint is not None:
        load_trainable_weights(model, checkpoint)
    decoder = CachedDecoder if kv_cache else UncachedDecoder
    return Evaluator(model.to(device), tokenizer, build_image_transform(cfg), ids.eoc_token_id, device, decoder)


def init_ranks() -> Ranks:
    """Ranks from the launcher's environment (torchrun / deepspeed); gloo for the gathers."""
    from megaflamingo.parallel.topology import import_before_process_group

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        import_before_process_group()
        torch.distributed.init_process_group("gloo")
    return Ranks(int(os.environ.get("RANK", "0")), world)


def run_suite(ev: Evaluator, spec: dict, base: Path, tasks: list[str], shots: list[int],
              seeds: list[int], settings: TrialSettings, ranks: Ranks = Ranks(),
              progress: bool = True) -> dict | None:
    """Every (task, shots, seed); on rank 0 {"results": {task: {shots: summary}}, "trials": [...]}.

    Raises:
        ValueError: a task missing from the data spec, or a bad file (one line).
    """
    results: dict = {}
    trials = []
    for name in tasks:
        if name not in spec:
            raise ValueError(f"the data spec has no entry for task {name!r}")
        task = TASKS[name]
        need_demos = max(shots) > 0 or task.zero_shot_demos > 0
        data = load_task_data(task, spec[name], base, need_demos)
        for k in shots:
            scores = []
            for seed in seeds:
                out = run_trial(ev, task, data, replace(settings, shots=k, seed=seed), ranks, progress)
                if out is not None:
                    scores.append(out["score"])
                    trials.append({"task": name, "shots": k, "seed": seed, **out})
            if ranks.rank == 0:
                results.setdefault(name, {})[k] = summarize(scores)
    if ranks.rank != 0:
        return None
    return {"results": results, "trials": trials}


def write_outputs(summary: dict, out_dir: Path, meta: dict) -> tuple[Path, Path]:
    """results.json (scores, settings, per-trial predictions) and results.md (the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = {t: TASKS[t].kind for t in summary["results"]}
    table = markdown_table(summary["results"], kinds)
    js = out_dir / "results.json"
    js.write_text(json.dumps({**meta, **summary}, indent=1, default=str))
    md = out_dir / "results.md"
    md.write_text(f"# megaflamingo few-shot evaluation\n\n{json.dumps(meta, default=str)}\n\n{table}")
    return js, md


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_easyvqa_check(cfg, args, ranks: Ranks) -> int:
    """`evaluate.py vqa`: the easy-vqa task at 0 shots (+ the blank-image baseline), demo JSON."""
    ckpt = resolve_checkpoint(cfg, args.checkpoint)
    ev = build_evaluator(cfg, ckpt, _device(), kv_cache=not args.no_kv_cache)
    data = Path(args.data)
    spec, settings = {"easyvqa": {"test": str(data.resolve())}}, TrialSettings(0, num_samples=args.limit, batch_size=16)
    result: dict = {"checkpoint": str(ckpt)}
    for name, blank in (("trained", False), ("blank_images", True)):
        if blank and not args.baseline:
            continue
        out = run_suite(replace(ev, blank_images=blank), spec, data.parent, ["easyvqa"], [0], [42], settings,
                        ranks, progress=False)
        if out is not None:
            trial = out["trials"][0]
            by_id = {ex["question_id"]: ex for ex in trial["predictions"][:5]}
            questions = {json.loads(line)["question_id"]: json.loads(line) for line in data.read_text().splitlines()
                         if line.strip()}
            examples = [(questions[q]["question"], p["answer"], questions[q]["answers"][0]) for q, p in by_id.items()]
            result[name] = {"accuracy": trial["score"], "count": trial["count"], "examples": examples}
            print(f"{name}: VQA accuracy {trial['score']:.1f}% on {trial['count']} questions")
    if ranks.rank == 0 and args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def run_cli(cfg, args) -> int:
    """What launcher/evaluate.py runs after parsing (either form); returns the exit code."""
    ranks = init_ranks()
    try:
        if getattr(args, "task", None) == "vqa":
            return run_easyvqa_check(cfg, args, ranks)
        tasks = parse_tasks(args.tasks)
        shots = [int(s) for s in args.shots.split(",")]
        seeds = [int(s) for s in args.trial_seeds.split(",")] if args.trial_seeds else \
            [42 + i for i in range(args.trials)]
        if len(seeds) != args.trials or any(k < 0 for k in shots):
            raise ValueError("--trial-seeds needs one seed per trial, and --shots non-negative counts")
        spec, base = read_data_spec(args.data)
        ckpt = resolve_checkpoint(cfg, args.checkpoint)
        out_dir = Path(args.out)
        settings = TrialSettings(0, num_samples=args.num_samples, query_set_size=args.query_set_size,
                                 batch_size=args.batch_size, rices=args.rices, vqa_mode=args.vqa_metric,
                                 rices_cache=Path(args.rices_cache) if args.rices_cache else out_dir / "rices")
        ev = build_evaluator(cfg, ckpt, _device(), kv_cache=not args.no_kv_cache)
        summary = run_suite(ev, spec, base, tasks, shots, seeds, settings, ranks)
        if summary is not None:
            meta = {"checkpoint": str(ckpt), "config": args.config, "shots": shots, "seeds": seeds,
                    "rices": args.rices, "num_samples": args.num_samples, "vqa_metric": args.vqa_metric,
                    "world_size": ranks.world}
            js, md = write_outputs(summary, out_dir, meta)
            print(md.read_text())
            print(f"wrote {js} and {md}")
        return 0
    finally:
        if ranks.world > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

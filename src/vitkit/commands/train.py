"""`vitkit train`, `vitkit eval` and `vitkit predict`.

``vitkit train`` takes every TrainConfig field as ``--key value`` (dashes or underscores);
the flags are generated from the dataclass, so the config file, the flags and the code
can never disagree on a name or a type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ..data import FOLDER_LOADING
    from ..evaluate import EVAL_PRECISIONS
    from ..train import TrainConfig, field_help, field_types

    p = sub.add_parser(
        "train", help="train a ViT (digits, fashion-mnist or an image folder); resumable",
        description="Defaults < --config FILE < --key value flags. Every option of the config file is a flag.",
        allow_abbrev=False,  # `--epoch 3` is a typo to report, not a prefix of --epochs to guess
    )
    p.add_argument("--config", help="a YAML file of training options (see configs/*.yaml)")
    p.add_argument("--resume", metavar="RUN", help="continue runs/NAME from its last/ checkpoint")
    defaults, helps = TrainConfig(), field_help()
    for name, (tp, _optional) in field_types().items():
        flag = "--" + name.replace("_", "-")
        aliases = [flag] + (["--" + name] if "_" in name else [])
        text = helps.get(name, "")
        if "(default" not in text:  # --name, --out, --data-dir say what their None means
            text += f" (default: {getattr(defaults, name)!r})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, metavar=tp.__name__.upper(), help=text)
        if tp is bool:
            # `--ema` alone means true; `--ema false` turns it off
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        p.add_argument(*aliases, **kwargs)  # values stay strings here: TrainConfig's types check them
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="top-1/top-5/loss, per-class accuracy and a confusion matrix of a checkpoint")
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="a run folder (uses best/) or a checkpoint directory")
    p.add_argument("--dataset", help="digits | fashion-mnist | folder:PATH | csv:FILE (default: the one it was trained on)")
    p.add_argument("--data-dir", help="where the dataset's files are")
    p.add_argument("--batch-size", type=int, default=512, help="images a batch (memory only: no effect on the scores)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda where there is one)")
    p.add_argument("--precision", default="fp32", choices=EVAL_PRECISIONS,
                   help="bf16: autocast; int8: dynamically quantised Linear layers (CPU)")
    p.add_argument("--confusion", metavar="PNG", help="where to write the confusion matrix")
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--folder-loading", default="auto", choices=FOLDER_LOADING,
                   help="a folder dataset: decode it once into memory, or stream each batch from the files "
                        "(auto: stream when it would fill a quarter of the RAM)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory, or a run folder (uses best/)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or directories of them (searched to any depth)")
    p.add_argument("--topk", type=int, default=5, help="how many of the likeliest classes to list (at least 1)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report an unreadable file and go on with the others (exit status 1 if any)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda where there is one)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> int:
    from ..train import Interrupted, TrainConfig, resolve_config, resume

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in known}
    import torch.distributed as dist

    try:
        if args.resume:
            if args.config:
                raise ValueError("--resume RUN uses the run's own config.yaml; drop --config")
            resume(args.resume, overrides)
        else:
            from ..train import train

            train(resolve_config(args.config, overrides))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank is done with its collectives before any tears its group down
        code = 0
    except Interrupted as e:
        if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):  # said once, by rank 0
            print(str(e), file=sys.stderr, flush=True)
        code = 128 + e.signum if e.signum else 0
    finally:
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed:
        # Everything is saved. Gloo's worker threads may still hold tensors when Python finalises,
        # which aborts the process ("terminate called without an active exception", seen about once
        # in five FSDP runs here; pytorch/pytorch#179291): leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                            batch_size=args.batch_size, device=args.device, precision=args.precision,
                            confusion_png=args.confusion, skip_bad_images=args.skip_bad_images,
                            folder_loading=args.folder_loading)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['checkpoint']} on {r['dataset']} ({r['images']} images)")
    print(f"  top-1 {r['top1']:.2f}%   top-5 {r['top5']:.2f}%   loss {r['loss']:.4f}")
    print("  per-class accuracy:")
    for name, acc in r["per_class"].items():
        print(f"    {name:>16s}  {acc:6.2f}%")
    print(f"  confusion matrix: {r['confusion_png']}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..predict import predict_files

    results = predict_files(args.checkpoint, args.images, topk=args.topk, device=args.device,
                            skip_bad_images=args.skip_bad_images)
    failed = sum("error" in r for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
        return 1 if failed else 0
    for r in results:
        if "error" in r:
            print(f"{r['image']}: unreadable ({r['error']})")
            continue
        best = r["predictions"][0]
        print(f"{r['image']}: {best['label']} ({100 * best['probability']:.1f}%)")
        for p in r["predictions"][1:]:
            print(f"    {p['label']:>16s}  {100 * p['probability']:5.1f}%")
    if failed:
        print(f"{failed} of {len(results)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0

"""`medlsam train`: self-supervised MedLAM pretraining (RDR + MSS) on unlabeled CT studies.

One process by default; for several GPUs or nodes run it under torchrun, e.g.
    torchrun --nproc_per_node 4 -m medlsam.cli train data/ --out runs/medlam
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# TrainConfig fields that command-line options may override (option dest -> field).
_OVERRIDES = {
    "iterations": "iterations",
    "spacing": "spacing_mm",
    "patch_size": "patch_size",
    "base_channels": "base_channels",
    "batch_size": "batch_size",
    "mss_pairs": "mss_pairs",
    "lr": "learning_rate",
    "workers": "num_workers",
    "threads": "threads",
    "device": "device",
    "seed": "seed",
    "log_every": "log_every",
    "checkpoint_every": "checkpoint_every_s",
    "init_weights": "init_weights",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain MedLAM (RDR + MSS) on unlabeled CT",
        description="Self-supervised MedLAM pretraining. Writes OUT/medlam.pt (weights + config), "
        "OUT/checkpoint.pt (for --resume), OUT/train.log and TensorBoard scalars in OUT/tb. "
        "Defaults are the paper's configuration (GPU); --demo selects the small CPU configuration.",
    )
    p.add_argument("data", nargs="+", help="CT NIfTI files, folders of them, or glob patterns")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--demo", action="store_true", help="start from the small CPU configuration (base 8, 32^3 at 6 mm)")
    p.add_argument("--config", type=Path, default=None, help="TrainConfig as JSON (options below override it)")
    p.add_argument("--iterations", type=int, default=None, help="total iterations (including resumed ones)")
    p.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM", help="grid spacing, 1 or 3 values (z y x)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, metavar="VOX", help="patch size, 1 or 3 values (multiples of 16)")
    p.add_argument("--base-channels", type=int, default=None, help="network width b (official: 24)")
    p.add_argument("--batch-size", type=int, default=None, help="crop pairs per iteration and process")
    p.add_argument("--mss-pairs", type=int, default=None, help="pairs per iteration that also train MSS")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None, help="iterations between progress lines")
    p.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS")
    p.add_argument("--init-weights", default=None, help="start from these MedLAM weights (e.g. medlam.pth)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from trainers.medlam.config import TrainConfig, demo_config

    values = {}
    if args.config is not None:
        values = TrainConfig.from_json(args.config).to_dict()
    for dest, name in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[name] = value
    return demo_config(**values) if args.demo else TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from trainers.medlam import train
    from trainers.medlam.data import find_images
    from trainers.medlam.loop import CHECKPOINT

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    cfg = build_config(args)
    images = find_images(list(args.data))
    if (args.out / CHECKPOINT).exists() and not args.resume:
        raise ValueError(
            f"{args.out} already holds a training checkpoint: pass --resume to continue it or "
            "choose another --out"
        )
    print(f"training on {len(images)} studies -> {args.out}", file=sys.stderr)
    published = train(cfg, images, str(args.out), resume=args.resume)
    print(published)
    return 0

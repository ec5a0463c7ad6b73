"""Train a Med-NCA segmentation model with the paper's recipe.

Loss Dice + BCE, Adam (lr 1.6e-3, betas 0.5/0.5), ExponentialLR 0.9999 per batch,
256x256 slices (``--size``), batch 20, 64 NCA steps per level, level 1 trained on one
random 64x64 patch per image (``--patch 64``, the default) or on the full image
(``--full-res``).

Data: a Medical Segmentation Decathlon style folder (``imagesTr/*.nii.gz`` and
``labelsTr/*.nii.gz``; 2D slices along ``--slice-axis``, resized to ``--size``
with the original preprocessing, labels binarised) or, by default, a synthetic
set of noisy ellipses generated on the fly.

    python examples/train_mednca.py --iters 500 --size 64 --steps 32        # synthetic, quick
    python examples/train_mednca.py --data Task04_Hippocampus --size 64 --steps 16 --full-res
    torchrun --nproc_per_node 4 examples/train_mednca.py --data Task01_BrainTumour --size 256

Checkpoints (``last.pt``, ``best.pt``; load with ``MedNCA.load``) go to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastnca.models.mednca import MedNCA, dice_bce_loss, preprocess_slice, soft_dice, synthetic_ellipses

try:
    from tqdm import tqdm
except ImportError:  # progress bar is optional
    tqdm = None


# --------------------------------------------------------------------------- data


def load_msd(root: Path, size: int, axis: int, modality: int, min_foreground: int = 0):
    """Cases of an MSD task folder as a list of (image [Z,1,S,S], label [Z,1,S,S]) tensors."""
    import nibabel as nib

    cases = []
    for img_path in sorted((root / "imagesTr").glob("*.nii*")):
        if img_path.name.startswith("._"):  # macOS metadata files ship in some MSD tarballs
            continue
        image = np.asarray(nib.load(img_path).dataobj, dtype=np.float64)
        if image.ndim == 4:  # multi-modal tasks (e.g. BrainTumour): pick one modality
            image = image[..., modality]
        label = np.asarray(nib.load(root / "labelsTr" / img_path.name).dataobj)
        image, label = np.moveaxis(image, axis, 0), np.moveaxis(label, axis, 0)
        imgs, labs = [], []
        for z in range(image.shape[0]):
            if image[z].max() == image[z].min():
                continue  # empty slice: nothing to normalise
            i, l = preprocess_slice(image[z], label[z], size)
            imgs.append(i)
            labs.append(l)
        if imgs:
            cases.append((torch.from_numpy(np.stack(imgs))[:, None], torch.from_numpy(np.stack(labs))[:, None]))
    if not cases:
        raise SystemExit(f"no cases found in {root}/imagesTr")
    return cases


def make_data(args):
    """(train images, train labels, validation volumes)."""
    g = torch.Generator().manual_seed(args.seed)
    if args.data is None:
        x, y = synthetic_ellipses(args.synthetic_n, args.size, generator=g)
        xv, yv = synthetic_ellipses(max(args.synthetic_n // 8, 4), args.size, generator=g)
        return x, y, [(xv[i : i + 1], yv[i : i + 1]) for i in range(len(xv))]
    cases = load_msd(Path(args.data), args.size, args.slice_axis, args.modality)
    if len(cases) == 1:  # nothing to hold out: validate on the training case, and say so
        print(f"{args.data}: one case only, so the validation Dice is measured on the training case "
              "(not held out)")
        return cases[0][0], cases[0][1], cases
    perm = torch.randperm(len(cases), generator=g).tolist()
    n_val = min(max(1, round(args.val_fraction * len(cases))), len(cases) - 1)
    val = [cases[i] for i in perm[:n_val]]
    train = [cases[i] for i in perm[n_val:]]
    x = torch.cat([c[0] for c in train])
    y = torch.cat([c[1] for c in train])
    return x, y, val


# --------------------------------------------------------------------------- training


class TrainStep(nn.Module):
    """Model + loss behind one ``forward`` so DDP sees every parameter use."""

    def __init__(self, model: MedNCA, patch: int | None, backend: str | None):
        super().__init__()
        self.model, self.patch, self.backend = model, patch, backend

    def forward(self, image, target):
        if self.patch:
            logits, target = self.model.forward_patch(image, target, self.patch, backend=self.backend)
        else:
            logits = self.model(image, backend=self.backend)
        return dice_bce_loss(logits, target)


@torch.no_grad()
def validate(model: MedNCA, volumes, device, backend, autocast, batch: int = 64) -> float:
    """Mean over volumes of the soft Dice of the stacked slices (the original metric)."""
    model.eval()
    scores = []
    for img, lab in volumes:
        probs = []
        for i in range(0, len(img), batch):
            with autocast():
                logits = model(img[i : i + batch].to(device), seed=i, backend=backend)
            probs.append(torch.sigmoid(logits.float()).cpu())
        scores.append(soft_dice(torch.cat(probs), lab))
    model.train()
    return float(np.mean(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ap.add_argument_group("data")
    data.add_argument("--data", type=Path, default=None, help="MSD task folder (imagesTr/, labelsTr/); default: synthetic")
    data.add_argument("--slice-axis", type=int, default=2)
    data.add_argument("--modality", type=int, default=0, help="channel of 4D (multi-modal) images")
    data.add_argument("--size", type=int, default=256, help="slices are resized to size x size (paper: 256)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="fraction of MSD cases held out")
    data.add_argument("--synthetic-n", type=int, default=512, help="synthetic training images")
    model = ap.add_argument_group("model")
    model.add_argument("--channels", type=int, default=32)
    model.add_argument("--hidden", type=int, default=128)
    model.add_argument("--steps", type=int, default=64, help="NCA steps per level")
    model.add_argument("--fire-rate", type=float, default=0.5)
    model.add_argument("--downscale", type=int, default=4)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--patch", type=int, default=64, help="level-1 training patch size (paper: 64)")
    mode.add_argument("--full-res", action="store_true", help="train level 1 on the whole image")
    opt = ap.add_argument_group("optimisation")
    opt.add_argument("--iters", type=int, default=3000)
    opt.add_argument("--batch-size", type=int, default=20, help="per process")
    opt.add_argument("--lr", type=float, default=1.6e-3)
    opt.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.5))
    opt.add_argument("--lr-gamma", type=float, default=0.9999, help="ExponentialLR gamma, stepped per batch")
    run = ap.add_argument_group("run")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--backend", default=None, help="fastnca backend (default: fastest available)")
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast (NCA state in bf16, kernels compute in fp32); default on for CUDA")
    run.add_argument("--val-every", type=int, default=250)
    run.add_argument("--out", type=Path, default=Path("runs/mednca"))
    run.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # -- distributed (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_proc = rank == 0
    log = (tqdm.write if tqdm else print) if main_proc else (lambda *a, **k: None)

    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    torch.manual_seed(args.seed)  # same data and initial weights on every rank
    x_train, y_train, val = make_data(args)
    patch = None if args.full_res or args.patch >= args.size else args.patch
    net = MedNCA(channels=args.channels, hidden=args.hidden, fire_rate=args.fire_rate, steps=args.steps,
                 downscale=args.downscale).to(device)
    step_fn = TrainStep(net, patch, args.backend)
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    optim = torch.optim.Adam(net.parameters(), lr=args.lr, betas=tuple(args.betas))
    sched = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=args.lr_gamma)
    torch.manual_seed(args.seed + 1000 * rank)  # masks, patches and batches differ per rank

    n_params = sum(p.numel() for p in net.parameters())
    log(f"Med-NCA {n_params:,} parameters | {len(x_train)} training slices {tuple(x_train.shape[-2:])}, "
        f"{len(val)} validation volumes | level 1 on {'patch ' + str(patch) if patch else 'full image'} | "
        f"{args.steps} steps/level | device {device}{' x' + str(world) if world > 1 else ''} | bf16 {bf16}")
    if main_proc:
        args.out.mkdir(parents=True, exist_ok=True)

    bar = tqdm(range(1, args.iters + 1), desc="train", disable=not main_proc) if tqdm else range(1, args.iters + 1)
    best, t0, running = -1.0, time.perf_counter(), None
    for it in bar:
        idx = torch.randint(0, len(x_train), (args.batch_size,))
        img, tgt = x_train[idx].to(device, non_blocking=True), y_train[idx].to(device, non_blocking=True)
        with autocast():
            loss = step_fn(img, tgt)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if tqdm and main_proc:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if main_proc and (it % args.val_every == 0 or it == args.iters):
            dice = validate(net, val, device, args.backend, autocast)
            net.save(args.out / "last.pt")
            if dice > best:
                best = dice
                net.save(args.out / "best.pt")
            log(f"iter {it:>6}  loss {running:.4f}  val Dice {dice:.4f}  (best {best:.4f})  "
                f"{(time.perf_counter() - t0) / it:.3f} s/iter")
    if main_proc:
        log(f"done: best validation Dice {best:.4f}; final lr {sched.get_last_lr()[0]:.6e}; checkpoints in {args.out}/")
    if world > 1:
        dist.barrier()  # rank 0 may still be sampling / saving: tear down together (gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

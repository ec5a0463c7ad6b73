"""Evaluate the authors' trained Med-NCA on a held-out hippocampus MRI, the original way.

Loads the published checkpoints (model0.pth, model1.pth, config.json) with
``MedNCA.from_original``, preprocesses each axial slice exactly like the original
evaluation (cubic resize to 64x64, min-max, 0.5/99.5 percentile rescale, label
nearest + binarised) and reports the soft Dice over the stacked volume for several
fire-mask seeds. The original code measures 0.8925 +- 0.0011 over 10 seeds.

    python examples/mednca_hippocampus.py --seeds 10              # fastest usable backend
    python examples/mednca_hippocampus.py --seeds 10 --backend reference  # plain PyTorch (slow)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastnca.models.mednca import MedNCA, preprocess_volume, soft_dice

PUBLISHED = (0.8925, 0.0011)  # soft Dice, original code, 10 mask seeds (seeds/MEDNCA.md)
PUBLISHED_HARD = (0.902, 0.0013)  # thresholded at 0.5


def default_data_dir() -> Path:
    """../shared/data/mednca-hippocampus beside the repository ($FASTNCA_SHARED overrides shared/)."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo / ".." / "shared", repo / "shared"]
    if os.environ.get("FASTNCA_SHARED"):
        candidates.insert(0, Path(os.environ["FASTNCA_SHARED"]))
    for shared in candidates:
        if (shared / "data" / "mednca-hippocampus").is_dir():
            return (shared / "data" / "mednca-hippocampus").resolve()
    return repo.parent / "shared" / "data" / "mednca-hippocampus"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="folder with model0.pth, model1.pth, config.json and the NIfTI pair")
    ap.add_argument("--image", default="image_hippocampus_374.nii.gz")
    ap.add_argument("--label", default="label_hippocampus_374.nii.gz")
    ap.add_argument("--seeds", type=int, default=10, help="number of fire-mask seeds (0..N-1)")
    ap.add_argument("--backend", default=None, help="fastnca backend (default: fastest available)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slice-axis", type=int, default=2, help="volume axis the 2D slices are taken along")
    ap.add_argument("--ensemble", type=int, default=0, metavar="N",
                    help="also run the M3D-NCA pseudo-ensemble of N members and print its quality score")
    args = ap.parse_args()

    try:
        import nibabel as nib
    except ImportError as e:
        raise SystemExit("this example needs nibabel: pip install nibabel") from e
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(x, **_):
            return x

    d = args.data_dir
    if not (d / "model0.pth").is_file():
        raise SystemExit(f"no Med-NCA checkpoint in {d}: pass --data-dir (or set FASTNCA_SHARED)")
    model = MedNCA.from_original(d / "model0.pth", d / "model1.pth", d / "config.json").to(args.device).eval()
    image = nib.load(d / args.image).get_fdata()
    label = nib.load(d / args.label).get_fdata()
    img, lab = preprocess_volume(image, label, size=64, axis=args.slice_axis)
    img, lab = img.to(args.device), lab.to(args.device)
    print(f"volume {image.shape} -> {img.shape[0]} slices of {tuple(img.shape[-2:])}, "
          f"{int(lab.sum())} foreground pixels; model: C={model.channels}, steps={model.steps}, "
          f"downscale={model.downscale}, device={args.device}, backend={args.backend or 'auto'}")

    soft, hard = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for seed in tqdm(range(args.seeds), desc="seeds"):
            prob = torch.sigmoid(model(img, seed=seed, backend=args.backend).float())
            soft.append(soft_dice(prob, lab))
            hard.append(soft_dice((prob > 0.5).float(), lab))
    elapsed = time.perf_counter() - t0

    print(f"\n{'seed':>4}  {'soft Dice':>9}  {'Dice@0.5':>8}")
    for s, (a, b) in enumerate(zip(soft, hard)):
        print(f"{s:>4}  {a:9.4f}  {b:8.4f}")
    print(f"\nsoft Dice   {np.mean(soft):.4f} +- {np.std(soft):.4f}  (original code: {PUBLISHED[0]} +- {PUBLISHED[1]})")
    print(f"Dice @ 0.5  {np.mean(hard):.4f} +- {np.std(hard):.4f}  (original code: {PUBLISHED_HARD[0]} +- {PUBLISHED_HARD[1]})")
    print(f"{args.seeds} seeds in {elapsed:.1f} s ({elapsed / max(args.seeds, 1):.2f} s per volume)")

    if args.ensemble:
        res = model.ensemble(img, n=args.ensemble, seed=0, backend=args.backend)
        # one score per volume: the sums run over all slices
        score = float(res.std.sum() / res.mean.sum())
        print(f"pseudo-ensemble of {args.ensemble}: Dice of the mean {soft_dice(res.mean, lab):.4f}, "
              f"quality score sum(std)/sum(mean) = {score:.4f}")


if __name__ == "__main__":
    main()

"""Sample from a GeCA checkpoint (ours from examples/train_geca.py, or the authors').

    python examples/sample_geca.py runs/geca/checkpoint.pt --labels "1,0,0,0,0;0,1,1,0,0" -n 8
    python examples/sample_geca.py ckpt.pt --labels all-single --cfg-scale 1.5 --steps 250
    python examples/sample_geca.py ckpt.pt --no-ghg            # ablation: re-seed every step
    python examples/sample_geca.py ckpt.pt --carry out+hidden  # any of the paper's GHG ablations

Writes a grid PNG (one row per label vector) and, with --save-pt, the raw samples.
The authors' checkpoints need the model sizes on the command line (--model GeCA-S
--num-classes 11 --image-size 256 --vae PATH for their latent models).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_geca's helpers

from train_geca import (MODEL_DEFAULTS, add_model_args, build_model, image_grid, load_vae,  # noqa: E402
                        sample_images, write_png)


def parse_labels(spec: str, num_classes: int) -> torch.Tensor:
    if spec == "all-single":
        return torch.eye(num_classes)
    if spec == "null":
        return torch.zeros(1, num_classes)
    rows = [[float(v) for v in r.split(",")] for r in spec.split(";") if r.strip()]
    y = torch.tensor(rows)
    if y.shape[1] != num_classes:
        raise SystemExit(f"label vectors have {y.shape[1]} entries, the model has {num_classes} classes")
    return y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    add_model_args(p, defaults=False)  # the checkpoint's values fill what is not given
    p.add_argument("--labels", default="all-single",
                   help='multi-hot vectors "1,0,1;0,1,0", or "all-single", or "null"')
    p.add_argument("-n", "--per-label", type=int, default=8)
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--image-size", type=int, default=None, help="default: from the checkpoint's args")
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder (latent models; default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=250, help="respaced diffusion steps")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--no-ghg", action="store_true", help="re-seed the cells at every diffusion step")
    p.add_argument("--carry", default=None, choices=["hidden", "out", "out+hidden", "none"])
    p.add_argument("--clip", default="off", choices=["on", "off"],
                   help="clip predicted x0 to [-1, 1] (default off, as the authors' sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="geca_samples.png")
    p.add_argument("--save-pt", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    saved = ck.get("args") if isinstance(ck, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    # Checkpoints of examples/train_geca.py carry their sizes (the authors' need the flags):
    # a size flag must agree with the weights; the sampling settings (--ca-steps,
    # --update-prob) given on the command line win over the checkpoint's.
    for k in ("model", "num_classes", "embed_dim", "heads", "dim_head", "mlp_dim", "hidden_channels"):
        if saved.get(k) is not None:
            given = getattr(args, k)
            if given is not None and given != saved[k]:
                p.error(f"--{k.replace('_', '-')} {given} does not match the checkpoint's {saved[k]} "
                        "(the size of its weights)")
            setattr(args, k, saved[k])
    for k, default in MODEL_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, saved[k] if saved.get(k) is not None else default)
    in_channels = args.in_channels or saved.get("in_channels", 4)
    size = args.image_size or saved.get("image_size", 32)
    vae_path = args.vae or saved.get("vae")  # a latent-space checkpoint decodes with its VAE
    vae = load_vae(vae_path, device) if vae_path else None
    if vae is not None:
        size //= 8

    model = build_model(args, in_channels)
    try:
        model.load_original_state_dict(ck, key=args.weights)
    except RuntimeError as e:  # size mismatches: the flags did not rebuild the trained model
        first = str(e).strip().splitlines()
        raise SystemExit(f"{args.checkpoint}: its weights do not fit the model built from the flags "
                         f"({args.model}, {args.num_classes} classes, {in_channels} input channels); pass the "
                         f"sizes it was trained with (--model, --num-classes, --in-channels, ...).\n"
                         + "\n".join(first[:4]))
    model.to(device).eval()

    y = parse_labels(args.labels, args.num_classes).repeat_interleave(args.per_label, 0)
    ghg = not args.no_ghg
    t0 = time.time()
    x = sample_images(model, y, size, in_channels, sample_steps=args.steps, cfg_scale=args.cfg_scale, ghg=ghg,
                      carry=args.carry, device=device, vae=vae, seed=args.seed, progress=True,
                      clip=args.clip == "on")
    dt = time.time() - t0
    write_png(args.out, image_grid(x, nrow=args.per_label))
    if args.save_pt:
        torch.save({"samples": x.cpu(), "labels": y}, args.save_pt)
    print(f"| samples | steps | cfg | carry | CA steps | update prob | time (s) |\n| {len(y)} | {args.steps} | "
          f"{args.cfg_scale} | {args.carry or ('default GHG' if ghg else 'none')} | {model.config.ca_steps} | "
          f"{model.config.update_prob} | {dt:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

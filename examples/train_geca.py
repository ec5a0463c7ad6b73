"""Train a GeCA diffusion model (Elbatel et al., MICCAI 2024) with fastnca.

Default: image space on a built-in synthetic multi-label data set generated on the
fly (coloured shapes on a dark background; label k = "shape k is in the picture";
4 channels = RGB + the shape-coverage mask, all in [-1, 1]), so the script runs
anywhere with no download:

    python examples/train_geca.py --model GeCA-XS --image-size 32 --iters 20000

Own data: a folder of images and a CSV ``filename,label_0,...,label_{K-1}`` (multi-hot
0/1 columns, header row) -> RGB images in [-1, 1] (in_channels 3); any format Pillow reads,
PNG also without Pillow:

    python examples/train_geca.py --data path/to/images --labels labels.csv --image-size 64

Latent space (as in the paper: 256 px images -> 32x32x4 SD-VAE latents, scale 0.18215),
only with a LOCAL diffusers AutoencoderKL (nothing is downloaded):

    python examples/train_geca.py --data imgs --labels labels.csv --image-size 256 --vae /path/to/sd-vae-ft-ema

Multi-GPU: ``torchrun --nproc_per_node 8 examples/train_geca.py ...`` (DDP; --batch-size is global).
Checkpoints hold {"model", "ema", "opt", "args", "step"}; sample with examples/sample_geca.py.
``--resume CHECKPOINT`` continues a run where it stopped, bitwise on the CPU: each step's
random draws (data order and flips, timesteps, noise, label dropout, fire masks) depend only
on (--seed, rank, step), given the same --batch-size and number of processes.
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import math
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastnca.models.geca import CONFIGS, GeCA, GeCAConfig
from fastnca.models.geca_diffusion import create_diffusion

LATENT_SCALE = 0.18215


# --------------------------------------------------------------------------- PNG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path, img) -> None:
    """Write a uint8 [H, W, 3] (or [H, W]) tensor/array as PNG (PIL if importable, else zlib)."""
    img = torch.as_tensor(img).to(torch.uint8).cpu()
    if img.ndim == 2:
        img = img[..., None].expand(-1, -1, 3)
    try:
        from PIL import Image
        Image.fromarray(img.numpy()).save(path)
        return
    except ImportError:
        pass
    H, W, _ = img.shape
    raw = b"".join(b"\x00" + img[y].contiguous().numpy().tobytes() for y in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def read_png(path) -> torch.Tensor:
    """Decode an 8-bit, non-interlaced grey / grey+alpha / RGB / RGBA PNG to uint8
    [H, W, channels] with zlib alone (the reader when Pillow is not installed)."""
    data = Path(path).read_bytes()
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG file")
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif tag == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        elif tag == b"IEND":
            break
        pos += 12 + n
    if header is None:
        raise ValueError(f"{path}: PNG without an IHDR chunk")
    W, H, depth, ctype, _, _, interlace = header
    ch = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or ch is None or interlace:
        raise ValueError(f"{path}: bit depth {depth}, colour type {ctype}, interlace {interlace}: without "
                         "Pillow only 8-bit non-interlaced grey/RGB(A) PNGs can be read (pip install pillow)")
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(H, 1 + W * ch)
    out = np.zeros((H + 1, W * ch), np.uint8)  # row 0: the zero row above the image
    for y in range(H):
        f, cur, up = rows[y, 0], rows[y, 1:], out[y]
        if f == 0:
            out[y + 1] = cur
        elif f == 1:  # Sub: running sum along the row, per channel (uint8 wraps mod 256)
            out[y + 1] = np.cumsum(cur.reshape(W, ch), axis=0, dtype=np.uint8).reshape(-1)
        elif f == 2:  # Up
            out[y + 1] = cur + up
        elif f in (3, 4):  # Average, Paeth: sequential along the row
            r, u = bytearray(cur.tobytes()), up.tobytes()
            for i in range(W * ch):
                a = r[i - ch] if i >= ch else 0
                b = u[i]
                if f == 3:
                    pred = (a + b) >> 1
                else:
                    c = u[i - ch] if i >= ch else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                r[i] = (r[i] + pred) & 0xFF
            out[y + 1] = np.frombuffer(bytes(r), np.uint8)
        else:
            raise ValueError(f"{path}: bad PNG filter type {f} in row {y}")
    return torch.from_numpy(out[1:].reshape(H, W, ch).copy())


def read_rgb(path) -> torch.Tensor:
    """An image file as uint8 RGB [H, W, 3]: Pillow when installed, else PNG only."""
    try:
        from PIL import Image
    except ImportError:
        img = read_png(path)
        return img[..., :3] if img.shape[-1] >= 3 else img[..., :1].expand(-1, -1, 3)
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> uint8 grid [H', W', 3] (first 3 channels; 1 channel -> grey)."""
    x = x.detach().float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    N, _, H, W = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(N))))
    rows = math.ceil(N / nrow)
    grid = torch.zeros(3, rows * (H + pad) + pad, nrow * (W + pad) + pad, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    return grid.permute(1, 2, 0)


# --------------------------------------------------------------------------- data


SHAPES = ("disc", "square", "triangle", "ring", "cross")


def synthetic_batch(n: int, size: int, num_classes: int = 5, generator: torch.Generator | None = None):
    """n images [n, 4, size, size] in [-1, 1] and multi-hot labels [n, num_classes]: each
    present shape (probability 0.5 each, at least one) is drawn with a random colour,
    centre and radius; channel 3 is the union of the shapes' masks."""
    g = generator
    K = min(num_classes, len(SHAPES))
    labels = (torch.rand(n, num_classes, generator=g) < 0.5).float()
    labels[:, K:] = 0
    none = labels[:, :K].sum(1) == 0
    labels[none, torch.randint(0, K, (int(none.sum()),), generator=g)] = 1
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    img = torch.full((n, 3, size, size), -0.8)
    img += 0.1 * torch.randn(n, 3, 1, 1, generator=g)  # background tint
    cover = torch.zeros(n, size, size)
    for k in range(K):
        cx, cy = (torch.rand(2, n, 1, 1, generator=g) * 0.6 + 0.2) * size
        r = (torch.rand(n, 1, 1, generator=g) * 0.12 + 0.12) * size
        dx, dy = xx - cx, yy - cy
        if SHAPES[k] == "disc":
            m = dx ** 2 + dy ** 2 <= r ** 2
        elif SHAPES[k] == "square":
            m = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
        elif SHAPES[k] == "triangle":
            m = (dy <= 0.8 * r) & (dy >= -r + 2 * dx.abs())
        elif SHAPES[k] == "ring":
            d2 = dx ** 2 + dy ** 2
            m = (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
        else:  # cross
            m = ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r))
        m = m & (labels[:, k, None, None] > 0)
        colour = torch.rand(n, 3, 1, 1, generator=g) * 1.6 - 0.6
        img = torch.where(m[:, None], colour.expand_as(img), img)
        cover = torch.maximum(cover, m.float())
    return torch.cat([img, cover[:, None] * 2 - 1], 1).clamp(-1, 1), labels


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded shuffle of range(n), as (index, flip) pairs: epoch e is a
    permutation and a coin per image drawn from (seed, e), split round-robin over the ranks
    (the tail that does not divide evenly is dropped, so every rank has the same count).
    ``start(epoch, skip)`` sets where the next iteration begins, so a resumed run continues
    the interrupted epoch without loading the images it skips, whatever --workers is."""

    def __init__(self, n: int, world: int, rank: int, seed: int):
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.n // self.world - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.n // self.world * self.world]
        flip = torch.rand(self.n, generator=g) < 0.5
        mine = order[self.rank:: self.world][self.skip:]
        return iter(zip(mine.tolist(), flip[mine].tolist()))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step's draws on one rank (data, timesteps, noise, fire masks):
    a function of (seed, rank, step) only, so --resume continues the run it resumes."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % (1 << 63)


class FolderDataset(torch.utils.data.Dataset):
    """Images listed in a CSV (header row; first column: file name relative to ``root``; other
    columns: multi-hot 0/1 labels) -> RGB [3, size, size] in [-1, 1] (centre crop, bicubic
    resize). Any format Pillow reads; PNG only when Pillow is not installed."""

    def __init__(self, root: str, labels_csv: str, size: int, hflip: bool = True):
        self.root, self.size, self.hflip = Path(root), size, hflip
        with open(labels_csv, newline="") as f:
            rows = list(csv.reader(f))
        header, rows = rows[0], [r for r in rows[1:] if r]
        if not rows or any(len(r) != len(header) for r in rows) or len(header) < 2:
            raise SystemExit(f"{labels_csv}: expected a header row and rows 'filename,label_0,...' "
                             f"with {len(header)} columns each")
        self.class_names = header[1:]
        self.files = [r[0] for r in rows]
        self.labels = torch.tensor([[float(v) for v in r[1:]] for r in rows])
        missing = [f for f in self.files if not (self.root / f).is_file()]
        if missing:
            raise SystemExit(f"{len(missing)} images listed in {labels_csv} are not in {root}, e.g. {missing[0]}")
        other = [f for f in self.files if Path(f).suffix.lower() != ".png"]
        if other and importlib.util.find_spec("PIL") is None:
            raise SystemExit(f"reading {other[0]} needs Pillow (pip install pillow); "
                             "without it only PNG images can be read")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        """key: an index, or (index, flip) as EpochSampler yields it (flips drawn with the order)."""
        i, flip = key if isinstance(key, tuple) else (key, False)
        x = read_rgb(self.root / self.files[i]).permute(2, 0, 1).float()
        _, h, w = x.shape
        s = min(h, w)
        x = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        if s != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bicubic", antialias=True,
                              align_corners=False)[0].clamp(0, 255)
        x = x / 127.5 - 1
        if self.hflip and flip:
            x = x.flip(-1)
        return x, self.labels[i]


def load_vae(path: str, device):
    if not Path(path).exists():
        raise SystemExit(f"--vae {path}: not a local path (this script never downloads weights)")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise SystemExit(f"--vae needs diffusers installed: {e}")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------- model


MODEL_DEFAULTS = {"model": "GeCA-XS", "num_classes": 5, "ca_steps": 12, "update_prob": 0.5}


def add_model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The model flags; ``defaults=False`` leaves unset ones None (MODEL_DEFAULTS then), so
    that a caller can tell a given flag from a default one."""
    d = MODEL_DEFAULTS if defaults else {}
    p.add_argument("--model", default=d.get("model"), choices=sorted(CONFIGS) + ["custom"],
                   help=f"default {MODEL_DEFAULTS['model']}")
    p.add_argument("--num-classes", type=int, default=d.get("num_classes"),
                   help=f"default {MODEL_DEFAULTS['num_classes']}")
    for name in ("embed-dim", "heads", "dim-head", "mlp-dim", "hidden-channels"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the --model size")
    p.add_argument("--ca-steps", type=int, default=d.get("ca_steps"), help=f"default {MODEL_DEFAULTS['ca_steps']}")
    p.add_argument("--update-prob", type=float, default=d.get("update_prob"),
                   help=f"default {MODEL_DEFAULTS['update_prob']}")
    p.add_argument("--backend", default=None, help="fastnca backend (default: fastest available)")


def build_model(args, in_channels: int) -> GeCA:
    sizes = dict(CONFIGS.get(args.model, CONFIGS["GeCA-XS"]))
    for k in ("embed_dim", "heads", "dim_head", "mlp_dim", "hidden_channels"):
        if getattr(args, k, None) is not None:
            sizes[k] = getattr(args, k)
    cfg = GeCAConfig(**sizes, in_channels=in_channels, num_classes=args.num_classes,
                     ca_steps=args.ca_steps, update_prob=args.update_prob)
    return GeCA(cfg, backend=args.backend)


def label_bank(num_classes: int, n: int) -> torch.Tensor:
    """n label vectors for sample grids: each class alone, then pairs, cycled."""
    vecs = [torch.eye(num_classes)[k] for k in range(num_classes)]
    vecs += [torch.eye(num_classes)[k] + torch.eye(num_classes)[(k + 1) % num_classes] for k in range(num_classes)]
    return torch.stack([vecs[i % len(vecs)] for i in range(n)])


@torch.no_grad()
def sample_images(model, y, size, in_channels, *, sample_steps, cfg_scale, ghg=True, carry=None, device,
                  vae=None, seed=0, progress=False, clip=False):
    """Respaced ancestral sampling, decoded by the VAE if any. ``clip``: clip the predicted x0
    to [-1, 1] (off by default: the authors' sampler never clips, in latent or image space)."""
    diff = create_diffusion(str(sample_steps))
    g = torch.Generator(device=device).manual_seed(seed)
    x = diff.sample(model, y.to(device), (len(y), in_channels, size, size), cfg_scale=cfg_scale, ghg=ghg,
                    carry=carry, clip_denoised=clip, generator=g,
                    progress=progress)
    if vae is not None:
        x = vae.decode(x / LATENT_SCALE).sample
    return x


# --------------------------------------------------------------------------- train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", default=None, help="image folder (default: synthetic shapes)")
    p.add_argument("--labels", default=None, help="CSV: filename,label_0,...")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder -> latent space")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (the paper: 128)")
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast on GPU (auto: bf16 if supported, else fp16)")
    p.add_argument("--no-step-checkpoint", action="store_true",
                   help="store every CA step's activations instead of recomputing them in backward")
    p.add_argument("--out", default="runs/geca")
    p.add_argument("--ckpt-every", type=int, default=2000, help="also at the end; 0: only at the end")
    p.add_argument("--sample-every", type=int, default=1000,
                   help="preview grid every N steps and at the end; 0: no previews")
    p.add_argument("--sample-n", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=50, help="respaced steps for preview grids")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--resume", default=None)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    for flag, low in {"iters": 0, "ckpt_every": 0, "sample_every": 0, "batch_size": 1, "sample_n": 1,
                      "sample_steps": 1}.items():
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    main_proc = rank == 0
    torch.manual_seed(args.seed + rank)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    local_batch = args.batch_size // world
    out = Path(args.out)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)

    # data
    vae = load_vae(args.vae, device) if args.vae else None
    if args.data:
        if not args.labels:
            raise SystemExit("--data needs --labels CSV")
        ds = FolderDataset(args.data, args.labels, args.image_size)
        args.num_classes = ds.labels.shape[1]
        sampler = EpochSampler(len(ds), world, rank, args.seed)
        per_epoch = len(sampler) // local_batch
        if per_epoch == 0:  # drop_last would leave no batch at all: never loop on nothing
            raise SystemExit(f"{len(ds)} images give {len(sampler)} per process, fewer than the per-process "
                             f"batch {local_batch}: lower --batch-size")
        loader = torch.utils.data.DataLoader(ds, local_batch, sampler=sampler, num_workers=args.workers,
                                             drop_last=True, pin_memory=device.type == "cuda",
                                             persistent_workers=args.workers > 0,
                                             generator=torch.Generator().manual_seed(args.seed))
        # (its own generator: a new epoch's iterator draws a worker seed, not from the step's stream)
        in_channels = 4 if vae is not None else 3

        def batches(first_step):
            epoch, skip = divmod(first_step, per_epoch)
            while True:
                sampler.start(epoch, skip * local_batch)
                yield from loader
                epoch, skip = epoch + 1, 0
    else:
        if vae is not None:
            raise SystemExit("--vae needs --data (the synthetic set is image-space)")
        in_channels = 4

        def batches(first_step):
            while True:  # drawn from the step's seed (set in the loop)
                yield synthetic_batch(local_batch, args.image_size, args.num_classes)
    size = args.image_size // 8 if vae is not None else args.image_size

    # model: the same initial weights on every rank (so the EMA copies agree too)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(args, in_channels).to(device)
    model.checkpoint_steps = not args.no_step_checkpoint
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step = int(ck.get("step", 0))
    diffusion = create_diffusion("")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    amp_dtype = None
    if device.type == "cuda" and args.amp != "none":
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            args.amp, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    n_params = sum(p.numel() for p in model.parameters())
    if main_proc:
        print(f"{args.model}: {n_params:,} parameters, cells {model.cell_channels} ch, grid {size}x{size}, "
              f"device {device}, world {world}, amp {amp_dtype}, step checkpoint {model.checkpoint_steps}")

    try:
        from tqdm import tqdm
        bar = tqdm(total=args.iters, initial=step, disable=not main_proc, dynamic_ncols=True)
    except ImportError:
        bar = None
    fixed_y = label_bank(args.num_classes, args.sample_n)
    it = batches(step)
    t0, seen, loss_avg = time.time(), 0, None
    model.train()
    while step < args.iters:
        torch.manual_seed(step_seed(args.seed, rank, step))
        x0, y = next(it)
        x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if vae is not None:
            with torch.no_grad():
                x0 = vae.encode(x0).latent_dist.sample() * LATENT_SCALE
        t = diffusion.sample_timesteps(x0.shape[0], device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = diffusion.training_losses(net, x0, t, y)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        step += 1
        seen += x0.shape[0] * world
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", mse=f"{losses['mse'].mean().item():.4f}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
        if main_proc and args.sample_every and (step % args.sample_every == 0 or step == args.iters):
            imgs = sample_images(ema, fixed_y, size, in_channels, sample_steps=args.sample_steps,
                                 cfg_scale=args.cfg_scale, ghg=True, device=device, vae=vae)
            write_png(out / f"samples_{step:07d}.png", image_grid(imgs))
        if main_proc and ((args.ckpt_every and step % args.ckpt_every == 0) or step == args.iters):
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "args": vars(args) | {"in_channels": in_channels, "latent_size": size}, "step": step},
                       out / "checkpoint.pt")
    if bar is not None:
        bar.close()
    if main_proc and loss_avg is None:  # resumed at or past --iters: nothing ran
        print(f"nothing to train: the checkpoint is at step {step}, --iters is {args.iters}")
    elif main_proc:
        dt = time.time() - t0
        print(f"| iters | images | time (s) | images/s | final loss (EMA-smoothed) |\n"
              f"| {step} | {seen} | {dt:.1f} | {seen / dt:.1f} | {loss_avg:.4f} |")
        print(f"checkpoint: {out / 'checkpoint.pt'}")
    if world > 1:
        dist.barrier()  # rank 0 may still be sampling / saving: tear down together (gloo aborts otherwise)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Train the small Vision Transformer the graph-path benchmark quantizes, on Fashion-MNIST, on
the CPU; write its weights (safetensors), its torch.export program (.pt2, dynamic batch) and a
JSON with the recipe and the FP top-1 on the 10k test images.

    python -m bench.train_vit --out bench/models --threads 1    # 23.5 min on one core: 89.24 %

Same data and preprocessing as the reference models (shared/reference/README.md): the 28x28
image replicated to 3 channels, /255, normalised with mean 0.286 and std 0.353; random 2-pixel
shifts and horizontal flips while training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from clcalib.testing import require_dataset, split

MEAN, STD = 0.286, 0.353
ARCH = dict(image_size=28, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)


def vit() -> torch.nn.Module:
    """ViT with 7x7 patches of 4x4 pixels (49 tokens + class token), 4 blocks, width 64."""
    return torchvision.models.VisionTransformer(**ARCH)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 pixels (zero padding in normalised units) and horizontal flip."""
    pad = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = pad[:, :, dy : dy + 28, dx : dx + 28]
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return 100.0 * float((pred == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/models"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    require_dataset()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    tx, ty = split("train")
    vx, vy = split("t10k")
    train_x, train_y = to_tensor(tx), torch.from_numpy(ty.astype(np.int64))
    test_x, test_y = to_tensor(vx), torch.from_numpy(vy.astype(np.int64))
    model = vit()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd)
    steps = a.epochs * (len(train_x) // a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(perm) - a.batch + 1, a.batch):
            idx = perm[i : i + a.batch]
            loss = F.cross_entropy(model(augment(train_x[idx], gen)), train_y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{a.epochs} loss {loss.item():.3f} test {accuracy(model, test_x, test_y):.2f}% "
              f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    a.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(a.out / "fmnist_vit.safetensors"))
    ep = torch.export.export(model, (test_x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    ep.example_inputs = None  # no images in the committed program
    torch.export.save(ep, a.out / "fmnist_vit.pt2")
    info = {"arch": "torchvision VisionTransformer", **ARCH, "epochs": a.epochs, "batch": a.batch, "lr": a.lr,
            "wd": a.wd, "seed": a.seed, "optimizer": "AdamW, one-cycle, label smoothing 0.1",
            "test_top1": accuracy(model, test_x, test_y), "train_seconds": round(time.time() - t0),
            "torch": torch.__version__, "command": f"python -m bench.train_vit --out {a.out} --epochs {a.epochs} --threads {a.threads}"}
    (a.out / "fmnist_vit.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()

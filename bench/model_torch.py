#!/usr/bin/env python3
"""PyTorch reference timing for the whole network (tools/reference_model.py, the DDC via grid_sample):
batch 1, full configuration (widths 48/96/192/384, hidden 768, Cout 16), float32, 2 threads, a random
input. Prints the forward time, or with --backward the forward + backward time (the gradients of every
parameter of sum(logits * g) for a random g, as `deformux bench backward` measures), median after one
warm-up, and the process's peak RSS. Skips cleanly without torch. Run it beside `deformux bench model`
/ `deformux bench backward` to compare in one sitting:

    python3 bench/model_torch.py [--size 96] [--block deformux|uxnet] [--threads 2] [--repeats 1] [--backward | --train]
"""
import argparse
import os
import resource
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--block", default="deformux", choices=["deformux", "uxnet"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of the forward")
    ap.add_argument("--train", action="store_true",
                    help="time one training step: forward, Dice + CE loss (MONAI's if installed, else the same "
                         "formula in torch), backward, AdamW (lr 1e-4, weight decay 0.08)")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("model_torch: torch is not installed; skipped")
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
    from reference_model import DeformUXNet

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mlp = "grouped" if a.block == "uxnet" else "dense"
    net = DeformUXNet(in_chans=1, out_chans=16, block=a.block, mlp=mlp)
    x = torch.randn(1, 1, a.size, a.size, a.size)

    if a.train:
        labels = torch.randint(0, 16, (1, 1, a.size, a.size, a.size))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.08)
        try:
            from monai.losses import DiceCELoss
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        except ImportError:
            def loss_fn(logits, target):
                p = torch.softmax(logits, 1)
                onehot = torch.nn.functional.one_hot(target[:, 0], logits.shape[1]).movedim(-1, 1).float()
                dims = tuple(range(2, logits.ndim))
                inter = (p * onehot).sum(dims)
                dice = 1 - (2 * inter + 1e-5) / (p.sum(dims) + onehot.sum(dims) + 1e-5)
                return dice.mean() + torch.nn.functional.cross_entropy(logits, target[:, 0])

    def step():
        if a.train:
            opt.zero_grad(set_to_none=False)
            loss_fn(net(x), labels).backward()
            opt.step()
        elif a.backward:
            net.zero_grad(set_to_none=False)
            (net(x) * g).sum().backward()
        else:
            with torch.no_grad():
                net(x)

    if a.backward:
        with torch.no_grad():
            g = torch.randn(net(x).shape)
    step()  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__} reference {a.block} ({mlp} MLP), {a.size}^3, batch 1, {a.threads} threads:")
    what = "training step" if a.train else ("forward+backward" if a.backward else "forward")
    print(f"  {what:16s} {statistics.median(times):8.3f} s")
    print(f"  peak RSS  {rss:8.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fp32 against bf16 autocast (channels-last): training and scoring throughput of the CIFAR models.

Times what ``precision: bf16`` changes, on random data (weights and pixels do not change the cost):
training steps (SGD, batch 128, forward + backward + step) and scoring passes (no gradient, batch
256, as candidate evaluation's calibration and scoring run). Each figure is the best of
``--repeats`` timed steps after one warm-up. The file records whether the device computes bf16
natively (CUDA, or a CPU with AVX512-BF16/AMX); without it PyTorch emulates bf16 through float32,
autoprune refuses ``precision: bf16`` and ``auto`` takes fp32, and this benchmark shows why.

Targets (#12, where bf16 is supported): >= 2x training and >= 1.5x candidate-evaluation throughput.

    python benchmarks/precision.py [--tasks cifar10-resnet20 cifar10-resnet56] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info, write_results  # noqa: E402
from autoprune.models import cifar_resnet  # noqa: E402
from autoprune.precision import Precision, as_input, autocast, bf16_supported, to_memory_format  # noqa: E402

MODELS = {"cifar10-resnet20": lambda: cifar_resnet(20), "cifar10-resnet56": lambda: cifar_resnet(56)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_seconds(step, repeats: int, device: torch.device) -> float:
    step()  # warm-up: oneDNN/cuDNN pick and cache their kernels
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def train_images_per_second(model: nn.Module, precision: Precision, device: torch.device, repeats: int) -> float:
    model = to_memory_format(model.to(device).train(), precision)
    x = as_input(torch.randn(128, 3, 32, 32, device=device), precision)
    y = torch.randint(0, 10, (128,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        with autocast(precision, device):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return 128 / _best_seconds(step, repeats, device)


def score_images_per_second(model: nn.Module, precision: Precision, device: torch.device, repeats: int) -> float:
    model = to_memory_format(model.to(device).eval(), precision)
    x = as_input(torch.randn(256, 3, 32, 32, device=device), precision)

    def step() -> None:
        with torch.no_grad(), autocast(precision, device):
            model(x)

    return 256 / _best_seconds(step, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    native = bf16_supported(device)
    rows = []
    for name in args.tasks:
        row: dict[str, object] = {"task": name}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            row[f"train_{precision}"] = train_images_per_second(MODELS[name](), precision, device, args.repeats)
            torch.manual_seed(0)
            row[f"score_{precision}"] = score_images_per_second(MODELS[name](), precision, device, args.repeats)
        row["train_speedup"] = row["train_bf16"] / row["train_fp32"]
        row["score_speedup"] = row["score_bf16"] / row["score_fp32"]
        rows.append(row)
        print(f"{name}: train {row['train_fp32']:.0f} -> {row['train_bf16']:.0f} img/s, "
              f"score {row['score_fp32']:.0f} -> {row['score_bf16']:.0f} img/s", flush=True)
    payload = {"benchmark": "precision", "machine": machine_info(), "device": str(device),
               "bf16_native": native, "threads": args.threads, "results": rows}
    lines = [f"Device {device}, {args.threads} threads; bf16 computed natively: {'yes' if native else 'no (emulated)'}. "
             "Images per second, best of "
             f"{args.repeats} steps: training (batch 128, SGD step) and scoring (batch 256, no gradient).", "",
             "| task | train fp32 | train bf16 | speedup | score fp32 | score bf16 | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['train_fp32']:.0f} | {r['train_bf16']:.0f} | {r['train_speedup']:.2f}x | "
                     f"{r['score_fp32']:.0f} | {r['score_bf16']:.0f} | {r['score_speedup']:.2f}x |")
    lines += ["", "Targets where bf16 is native: training >= 2x, candidate evaluation >= 1.5x."]
    write_results("precision", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

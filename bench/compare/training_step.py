#!/usr/bin/env python3
"""One training step of the MoE block, moe against PyTorch eager, in one run (issue 15 point 4).

PyTorch: the Hugging Face Mixtral-style sparse block (router nn.Linear, softmax, top-k, renormalise, a loop
over experts with index_add_), f32, forward + backward of y against a fixed dy, gradients reset between
steps. moe: moe_bench's forward_backward cells (re-pack as after an optimizer step, forward, backward). Both
time single steps, each right after reading 256 MiB, and report the median of 7, on 1 and 2 threads, on the
bench shapes S1 (d 1024, d_ff 3584, E 8, k 2) and S2 (d 1024, d_ff 512, E 64, k 6).

    /usr/bin/python3 bench/compare/training_step.py build/release/bench/moe_bench [T ...]

Needs Debian's python3-torch (run with /usr/bin/python3, which sees Debian's modules) and a real BLAS behind it:
Debian's torch calls whatever libblas.so.3 the alternatives system points to, and the reference BLAS it gets
by default is ~20x slower than OpenBLAS (apt-get install libopenblas0-pthread switches it); the header line
names the library. Prints a markdown table of tokens/s and the ratio moe / torch.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

SHAPES = {"S1": (1024, 3584, 8, 2), "S2": (1024, 512, 64, 6)}
REPS = 7


class Block(torch.nn.Module):
    def __init__(self, d, ff, n_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.w1 = torch.nn.ModuleList(torch.nn.Linear(d, ff, bias=False) for _ in range(n_experts))
        self.w3 = torch.nn.ModuleList(torch.nn.Linear(d, ff, bias=False) for _ in range(n_experts))
        self.w2 = torch.nn.ModuleList(torch.nn.Linear(ff, d, bias=False) for _ in range(n_experts))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=len(self.w1)).permute(2, 1, 0)  # (E, k, T)
        for e in range(len(self.w1)):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            h = x[token]
            out = self.w2[e](F.silu(self.w1[e](h)) * self.w3[e](h)) * weights[token, slot, None]
            y.index_add_(0, token, out)
        return y


_junk = torch.ones(1 << 26)


def flush():
    _junk.sum().item()


def torch_tokens_per_s(shape, n_tokens, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    block = Block(*shape)
    x = torch.randn(n_tokens, shape[0], requires_grad=True)
    dy = torch.randn(n_tokens, shape[0]) * 1e-3

    def step():
        block.zero_grad(set_to_none=False)
        x.grad = None
        block(x).backward(dy)

    for _ in range(2):
        step()  # warm-up: allocates the gradients
    times = []
    for _ in range(REPS):
        flush()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return n_tokens / statistics.median(times)


def moe_tokens_per_s(bench, token_counts):
    cells = "|".join(str(t) for t in token_counts)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        subprocess.run([bench, f"--benchmark_filter=^forward_backward/S./f32/T({cells})/",
                        f"--benchmark_out={out}", "--benchmark_out_format=json"],
                       check=True, stdout=subprocess.DEVNULL)
        data = json.load(open(out))
    result = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name") == "median":
            result[b["run_name"].split("/iterations")[0]] = b["tokens_per_s"]
    return result, data["context"]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    token_counts = [int(t) for t in sys.argv[2:]] or [512]
    moe, context = moe_tokens_per_s(sys.argv[1], token_counts)
    blas = os.path.realpath("/etc/alternatives/libblas.so.3-x86_64-linux-gnu")
    print(f"moe_isa {context.get('moe_isa')}, cpu {context.get('cpu_model')}, torch {torch.__version__}, "
          f"BLAS {blas}\n")
    print("| cell | threads | moe tokens/s | torch tokens/s | moe / torch |\n|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        for t in token_counts:
            for threads in (1, 2):
                ours = moe.get(f"forward_backward/{name}/f32/T{t}/threads{threads}")
                theirs = torch_tokens_per_s(shape, t, threads)
                ratio = f"{ours / theirs:.2f}" if ours else "-"
                print(f"| {name} T={t} | {threads} | {ours:.0f} | {theirs:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()

"""Batch-1 matrix products of the Qwen1.5-7B weight shapes on a GPU: the memory bandwidth each way of calling reaches.

    python bench/gemv.py [--repeat 100]

At batch 1 a decoding step reads every weight once, so its speed is the bandwidth of these products. Each shape is
timed with CUDA events over `--repeat` calls, rotating over enough weight copies that no call finds its weight in the
50 MB L2 cache, for `F.linear(x, W)` (what the model calls), `torch.mv(W, x)` and `W @ xᵀ`."""
import argparse
import torch
import torch.nn.functional as F

SHAPES = {'q/k/v/o (4096 x 4096)': (4096, 4096), 'q/k/v fused': (12288, 4096), 'gate/up': (11008, 4096),
          'gate/up fused': (22016, 4096), 'down': (4096, 11008), 'lm_head': (151936, 4096)}
WAYS = {'F.linear(x, W)': lambda x, w: F.linear(x, w), 'torch.mv(W, x)': lambda x, w: torch.mv(w, x[0]),
        'W @ x.T': lambda x, w: w @ x.t()}


def rate(f, x, ws, repeat:int) -> float:
    "Microseconds per call of `f`, rotating over the weights `ws`."
    for w in ws[:3]: f(x, w)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(repeat): f(x, ws[i % len(ws)])
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end)*1e3/repeat


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeat', type=int, default=100)
    a = ap.parse_args()
    print(f"{'weight':24s} " + ''.join(f"{w:>24s}" for w in WAYS) + "   (microseconds, GB/s)")
    for label, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device='cuda', dtype=torch.bfloat16) for _ in range(max(2, -(-200*2**20//(n*k*2))))]
        x = torch.randn(1, k, device='cuda', dtype=torch.bfloat16)
        ref = F.linear(x, ws[0]).float()
        cells = []
        for f in WAYS.values():
            assert (f(x, ws[0]).float().reshape(ref.shape) - ref).norm() <= 1e-2*ref.norm()
            us = rate(f, x, ws, a.repeat)
            cells.append(f"{us:9.1f} us {n*k*2/us/1e3:6.0f} GB/s")
        print(f"{label:24s} " + ''.join(f"{c:>24s}" for c in cells), flush=True)


if __name__ == '__main__': main()

"""Generation throughput of the tiny student: one prompt at a time (the seed's way) vs batched `generate_answers`.

Usage: python bench/generate_throughput.py [--prompts 64] [--max-new-tokens 64] [--batch-size 16] [--threads 2]
                                          [--window 30] [--hidden-size 128] [--layers 2]

Prompts are real: 30-day windows of the bundled A-share bars, written by `dataset.make_prompt`. The student is the
random tiny Qwen2 of `train.build_tiny_student` (its tokenizer trained on these prompts). Both ways decode greedily
with the same `max_new_tokens`; the script prints prompts/s, new tokens/s and the speed-up, and checks that both ways
give the same answers.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from stockdistill.config import bundled_codes
from stockdistill.data import load_bars
from stockdistill.dataset import make_prompt
from stockdistill.inference import generate_answers, strip_echo
from stockdistill.train import build_tiny_student, format_example


def real_prompts(n:int, window:int=30) -> list[str]:
    "`n` prompts from 30-day windows of the bundled stocks, spread over each stock's history."
    codes, out = bundled_codes(), []
    for k in range(n):
        bars = load_bars(codes[k % len(codes)])
        end = len(bars) - 1 - (k // len(codes)) * 97
        out.append(make_prompt(codes[k % len(codes)], bars.iloc[end-window+1:end+1]))
    return out


def one_by_one(model, tok, prompts, max_new_tokens):
    "The seed's loop: batch 1, no padding, decode the whole sequence and cut the echo."
    answers, new = [], 0
    with torch.inference_mode():
        for p in prompts:
            enc = tok(format_example(p), return_tensors='pt')
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new += out.shape[1] - enc['input_ids'].shape[1]
            answers.append(strip_echo(tok.decode(out[0], skip_special_tokens=True)))
    return answers, new


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--prompts', type=int, default=64)
    ap.add_argument('--max-new-tokens', type=int, default=64)
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--window', type=int, default=30, help='trading days per prompt')
    ap.add_argument('--hidden-size', type=int, default=128, help='student width (build_tiny_student default 128)')
    ap.add_argument('--layers', type=int, default=2, help='student depth (build_tiny_student default 2)')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = real_prompts(a.prompts, a.window)
    with tempfile.TemporaryDirectory() as d:
        model, tok = build_tiny_student(prompts, Path(d)/'tiny', hidden_size=a.hidden_size, layers=a.layers,
                                        intermediate_size=3*a.hidden_size, heads=max(4, a.hidden_size//64))
    model.eval()
    lens = [len(tok(format_example(p))['input_ids']) for p in prompts]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student: {n_params/1e6:.1f}M parameters, hidden {a.hidden_size}, {a.layers} layers")
    print(f"{len(prompts)} prompts, {min(lens)}-{max(lens)} tokens (mean {sum(lens)/len(lens):.0f}); "
          f"max_new_tokens={a.max_new_tokens}; torch threads={torch.get_num_threads()}")
    generate_answers(model, tok, prompts[:2], batch_size=2, max_new_tokens=4)  # warm-up

    t = time.perf_counter()
    single, new_single = one_by_one(model, tok, prompts, a.max_new_tokens)
    t_single = time.perf_counter() - t

    stats = {}
    batched = generate_answers(model, tok, prompts, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, stats=stats)
    t_batched = stats['seconds']

    same = sum(x == y for x, y in zip(single, batched))
    print(f"one by one : {t_single:7.2f} s  {len(prompts)/t_single:7.2f} prompts/s  {new_single/t_single:8.1f} tokens/s")
    print(f"batched {a.batch_size:<3}: {t_batched:7.2f} s  {len(prompts)/t_batched:7.2f} prompts/s  "
          f"{stats['new_tokens']/t_batched:8.1f} tokens/s")
    print(f"speed-up   : {t_single/t_batched:.1f}x   (same answers: {same}/{len(prompts)})")


if __name__ == '__main__': main()

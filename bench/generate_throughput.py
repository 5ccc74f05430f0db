"""Generation throughput of the tiny student: one prompt at a time (the seed's way) vs batched `generate_answers`.

Usage: python bench/generate_throughput.py [--prompts 64] [--max-new-tokens 128] [--batch-size 64] [--threads 2]
                                          [--window 30] [--max-tokens 900] [--modes each,padded] [--repeat 3]
                                          [--hidden-size 128] [--layers 2] [--shape qwen1.5-7b (GPU)]

Prompts are real: 30-day windows of the bundled A-share bars, cut to the quick start's budget (`--max-tokens 900`
characters, the earliest days dropped by `dataset.fit_prompt`, as `make run` does); `--max-tokens 0` keeps all 30
days (~2,000 tokens). The student is the random tiny Qwen2 of `train.build_tiny_student` (its tokenizer trained on
these prompts). Every way decodes greedily with the same `max_new_tokens`. The script prints prompts/s, new tokens/s
and the speed-up of each batched prefill mode over one by one, checks that every way gives the same answers, and
prints the time of the prefills alone (every prompt through the model once, unpadded): batching cannot share that
work, so one-by-one time / prefill time bounds any batched speed-up. Each way is timed `--repeat` times; the best
(least disturbed) time of each way gives the speed-up, as `timeit` advises, and the median is printed beside it.
On a GPU, `--shape qwen1.5-7b` replaces the tiny student by a random model of that exact shape (bf16) and runs the
GPU suite instead (`gpu_suite`): one by one (the seed's way, eager), batch 1 and batch 64 eager and compiled (static
KV cache of one shape per run, CUDA graphs: what `generate_answers` does on CUDA; `--captures own,trees` times both ways
of running the compiled step, `--fuse-proj` then the fused projections), agreement of batched greedy answers
with one-by-one ones, and `--answers` evaluation answers of `--max-new-tokens` tokens timed end to end, compilation
included. A random model never emits its end-of-sequence token, so every answer has the full budget.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stockdistill.config import bundled_codes
from stockdistill.data import load_bars
from stockdistill.prompt import fit_prompt, format_example
from stockdistill.generate import _pad_left, encode_prompts, fuse_projections, generate_answers, strip_echo
from stockdistill.train import build_tiny_student


def real_prompts(n:int, window:int=30, max_tokens:int=None) -> list[str]:
    "`n` prompts from `window`-day windows of the bundled stocks, spread over each stock's history, cut to `max_tokens`."
    codes, out = bundled_codes(), []
    for k in range(n):
        code = codes[k % len(codes)]
        bars = load_bars(code)
        end = len(bars) - 1 - (k // len(codes)) * 97
        out.append(fit_prompt(code, bars.iloc[end-window+1:end+1], max_tokens or None)[0])
    return out


def one_by_one(model, tok, prompts, max_new_tokens):
    "The seed's loop: batch 1, no padding, decode the whole sequence and cut the echo."
    answers, new = [], 0
    with torch.inference_mode():
        for p in prompts:
            enc = tok(format_example(p), return_tensors='pt').to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new += out.shape[1] - enc['input_ids'].shape[1]
            answers.append(strip_echo(tok.decode(out[0], skip_special_tokens=True)))
    return answers, new


def prefill_only(model, tok, prompts) -> float:
    "Seconds to run every prompt through the model once, alone and unpadded (the work batching cannot share)."
    t = time.perf_counter()
    with torch.inference_mode():
        for p in prompts: model(**tok(format_example(p), return_tensors='pt').to(model.device), logits_to_keep=1)
    return time.perf_counter() - t


def timed(f, repeat:int):
    "`(result of the last call, best seconds, median seconds)` of `repeat` calls of `f`."
    times = []
    for _ in range(repeat):
        t = time.perf_counter(); out = f(); times.append(time.perf_counter() - t)
    return out, min(times), statistics.median(times)


def gpu_suite(model, tok, prompts, a):
    "The GPU figures of issue #20: tokens/s at batch 1 and 64, eager and compiled, agreement, and N answers end to end."
    sync, out = (torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)), {}
    def clock(f):
        sync(); t = time.perf_counter(); r = f(); sync(); return r, time.perf_counter() - t
    few = prompts[:a.one_by_one]
    (single, n1), t1 = clock(lambda: one_by_one(model, tok, few, a.max_new_tokens))
    out['one_by_one_tok_s'] = n1/t1
    print(f"one by one (eager, the seed's way): {n1/t1:8.1f} tokens/s ({len(few)} prompts)", flush=True)
    ways = [] if a.skip_eager else [(False, 'eager', 'own')]
    ways += [(True, c, c) for c in a.captures.split(',')]
    if a.fuse_proj: ways.append((True, 'fused', 'own'))   # last: it changes the model
    for compile_, tag, capture in ways:
        if tag == 'fused': print(f"fused projections: {fuse_projections(model)} groups", flush=True)
        for bs, ps in ((1, few), (a.batch_size, prompts[:a.batch_size])):
            stats = {}
            run = lambda: generate_answers(model, tok, ps, batch_size=bs, max_new_tokens=a.max_new_tokens, compile=compile_,
                                           prefill='padded', capture=capture, stats=stats)
            _, t_first = clock(run)                  # the first call compiles (once per run shape)
            ans, t = min((clock(run) for _ in range(a.repeat)), key=lambda r: r[1])   # the best of --repeat
            out[f'{tag}_b{bs}_tok_s'] = stats['new_tokens']/t
            same = sum(x == y for x, y in zip(single, ans))
            if compile_:   # the prefill alone (same padding: greedy batches are as wide as their longest prompt), to
                           # separate decoding speed from reading the prompts
                ids, mask = _pad_left(encode_prompts(tok, ps), tok.pad_token_id, model.device)
                with torch.inference_mode():   # the best of 3: the first call of a new width pays one-off set-up costs
                    tp = min(clock(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1))[1] for _ in range(3))
                decoded = stats['new_tokens'] - len(ps)           # tokens after each row's first (which the prefill gives)
                rate = out[f'{tag}_b{bs}_decode_tok_s'] = decoded/(t - tp) if decoded > 0 and t > tp else None
                note = (f"         prefill of the batch alone {tp*1e3:.0f} ms ({ids.shape[1]} positions); decoding alone "
                        + (f"{rate:.1f} tokens/s" if rate else "not measurable (every row stopped at once)"))
            print(f"{tag:8s} batch {bs:3d}: {stats['new_tokens']/t:9.1f} tokens/s (first call {t_first:6.1f} s with compilation; "
                  f"best of {a.repeat} {t:6.2f} s); same greedy answers as one by one: {same}/{min(len(ans), len(single))}",
                  flush=True)
            if compile_: print(note, flush=True)
    if a.profile and torch.cuda.is_available():   # where one compiled batch's time goes, by GPU kernel
      from train_throughput import print_kernels
      for bs in (1, a.batch_size):
        ps = prompts[:bs]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _, t = clock(lambda: generate_answers(model, tok, ps, batch_size=bs, max_new_tokens=a.max_new_tokens, prefill='padded',
                                                  compile=True))
        print_kernels(prof, f"compiled batch {bs}, {t*1e3:.0f} ms:", 15)
    if a.gemv and torch.cuda.is_available(): gemv_rates(model)
    many_answers(model, tok, prompts, a, clock, out)
    return out


def gemv_rates(model, repeat:int=50):
    """The model's own weights as batch-1 products, each shape of a layer and the output head, and the memory bandwidth
    each reaches (`gemv.rate`, rotating over the layers' copies of a weight so that none is read from the L2 cache)."""
    from gemv import WAYS, rate
    rows = {}
    for name, m in [*model.model.layers[0].named_modules(), ('lm_head', model.lm_head)]:
        if isinstance(m, torch.nn.Linear):
            ws = [model.lm_head.weight] if name == 'lm_head' else [l.get_submodule(name).weight for l in model.model.layers]
            rows.setdefault(tuple(m.weight.shape), (name, ws))
    print("batch-1 products (the weight read once):", flush=True)
    for shape, (name, ws) in rows.items():
        x = torch.randn(1, ws[0].shape[1], device=ws[0].device, dtype=ws[0].dtype)
        us = rate(WAYS['F.linear(x, W)'], x, ws, repeat)
        print(f"  {name:28s} {str(shape):16s} {us:8.1f} us  {ws[0].numel()*ws[0].element_size()/us/1e3:7.0f} GB/s", flush=True)


def many_answers(model, tok, prompts, a, clock, out):
    "`a.answers` evaluation answers of `a.max_new_tokens` tokens in batches of `a.batch_size`, timed end to end."
    many = (prompts*((a.answers + len(prompts) - 1)//len(prompts)))[:a.answers]
    stats = {}
    _, t = clock(lambda: generate_answers(model, tok, many, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                                          prefill='padded', stats=stats))
    out['answers_s'] = t
    print(f"{a.answers} answers of {a.max_new_tokens} tokens, batch {a.batch_size}, compiled (the run's graph warm): {t:.1f} s, "
          f"{stats['new_tokens']/t:.0f} tokens/s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--prompts', type=int, default=64)
    ap.add_argument('--max-new-tokens', type=int, default=128, help="answer budget (the quick start's 128)")
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--window', type=int, default=30, help='trading days per window')
    ap.add_argument('--max-tokens', type=int, default=900, help="prompt budget in characters (quick start 900; 0: whole window)")
    ap.add_argument('--modes', default='each,padded', help="batched prefill modes to time: each, padded")
    ap.add_argument('--repeat', type=int, default=3, help='timings of each way (best and median are printed)')
    ap.add_argument('--hidden-size', type=int, default=128, help='student width (build_tiny_student default 128)')
    ap.add_argument('--layers', type=int, default=2, help='student depth (build_tiny_student default 2)')
    ap.add_argument('--shape', help="a random model of a real shape instead (GPU; see train_throughput.SHAPES)")
    ap.add_argument('--no-compile', action='store_true', help="stop HF generate from compiling decoding (GPU, static cache)")
    ap.add_argument('--one-by-one', type=int, default=8, help='prompts answered one by one in the GPU suite')
    ap.add_argument('--answers', type=int, default=1000, help='answers timed end to end in the GPU suite')
    ap.add_argument('--captures', default='own', help="GPU suite: how compiled steps run as CUDA graphs, comma-separated: own, trees (decode_greedy's capture)")
    ap.add_argument('--fuse-proj', action='store_true', help='GPU suite: then batch 1 and batch N again with fused q/k/v and gate/up projections (fuse_projections), and the N answers on that model')
    ap.add_argument('--skip-eager', action='store_true', help='GPU suite: time only the compiled ways (eager figures are known)')
    ap.add_argument('--gemv', action='store_true', help="GPU suite: time each weight shape's batch-1 product and print its memory bandwidth")
    ap.add_argument('--profile', action='store_true', help="GPU suite: print the costliest GPU kernels of one compiled batch")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = real_prompts(a.prompts, a.window, a.max_tokens)
    with tempfile.TemporaryDirectory() as d:
        model, tok = build_tiny_student(prompts, Path(d)/'tiny', hidden_size=a.hidden_size, layers=a.layers,
                                        intermediate_size=3*a.hidden_size, heads=max(4, a.hidden_size//64))
    if a.shape:
        from train_throughput import random_model
        model = random_model(a.shape)[0]
        model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    sync = torch.cuda.synchronize if model.device.type == 'cuda' else (lambda: None)
    lens = [len(tok(format_example(p))['input_ids']) for p in prompts]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student: {a.shape or 'tiny'}, {n_params/1e6:,.1f}M parameters on {model.device} "
          f"({torch.cuda.get_device_name() if model.device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(f"{len(prompts)} prompts ({a.window}-day windows, max_tokens={a.max_tokens or 'none'}), "
          f"{min(lens)}-{max(lens)} tokens (mean {sum(lens)/len(lens):.0f}); max_new_tokens={a.max_new_tokens}; "
          f"batch {a.batch_size}; best and median of {a.repeat}")
    if a.shape: return gpu_suite(model, tok, prompts, a)
    modes = a.modes.split(',')
    for m in modes: generate_answers(model, tok, prompts[:2], batch_size=2, max_new_tokens=4, prefill=m)  # warm-up
    one_by_one(model, tok, prompts[:1], 4)

    def run(f): return lambda: (f(), sync())[0]
    (single, new_single), t_single, med_single = timed(run(lambda: one_by_one(model, tok, prompts, a.max_new_tokens)), a.repeat)
    _, t_prefill, _ = timed(run(lambda: prefill_only(model, tok, prompts)), a.repeat)
    print(f"{'one by one':14s}: {t_single:7.2f} s (median {med_single:6.2f})  {len(prompts)/t_single:7.2f} prompts/s  "
          f"{new_single/t_single:8.1f} tokens/s")
    extra = dict(disable_compile=True) if a.no_compile else {}
    for m in modes:
        stats = {}
        batched, tb, med = timed(run(lambda: generate_answers(model, tok, prompts, batch_size=a.batch_size,
                                    max_new_tokens=a.max_new_tokens, prefill=m, stats=stats, **extra)), a.repeat)
        same = sum(x == y for x, y in zip(single, batched))
        print(f"{'batched ' + m:14s}: {tb:7.2f} s (median {med:6.2f})  {len(prompts)/tb:7.2f} prompts/s  "
              f"{stats['new_tokens']/tb:8.1f} tokens/s  speed-up {t_single/tb:4.1f}x (median {med_single/med:4.1f}x)  "
              f"same answers as one by one: {same}/{len(prompts)}")
    print(f"{'prefills alone':14s}: {t_prefill:7.2f} s  ({t_prefill/t_single:.0%} of one by one: no batching can beat "
          f"{t_single/t_prefill:.1f}x here)")


if __name__ == '__main__': main()

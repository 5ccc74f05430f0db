"""Compiled, batched greedy answers against one-by-one eager answers of the same tuned student (issue #20).

On CUDA, `generate_answers` answers greedy prompts in padded batches through `decode_greedy` (static cache, CUDA
graphs: forced here with `compile=True`, as a long evaluation gets them); the seed answered one prompt at a time with eager `generate`. Batching and bf16 change float rounding, which
can flip a greedy choice between two near-equal tokens. This script measures how often that happens on a run's
validation prompts and whether any evaluation metric moves:

    python bench/answer_agreement.py runs/gpu-tiny        # a finished `stockdistill distill` run folder

It prints the share of identical answers, where the first differing token falls, and the metrics of both ways side
by side (`score_answers`, without the embedding score).
"""
import argparse, json
from pathlib import Path

import torch

from stockdistill.evaluate import read_records, score_answers
from stockdistill.generate import encode_prompts, generate_answers, load_model


def first_difference(a:list, b:list):
    "Index of the first token where two token lists differ (None when equal)."
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run_inputs(run:Path, limit:int=None) -> tuple:
    "A finished run's config, its first teacher's cleaned validation records (the first `limit`) and that file's path."
    cfg = json.loads((run/'config.json').read_text())
    data = sorted(run.glob('teachers/*/cleaned_val_labeled_data.jsonl'))
    if not data: raise SystemExit(f"{run}: no teachers/*/cleaned_val_labeled_data.jsonl (is it a finished run folder?)")
    return cfg, read_records(data[0])[:limit], data[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run', help='a finished run folder (config.json, lora_adapter/, teachers/<name>/cleaned_val_*.jsonl)')
    ap.add_argument('--limit', type=int, default=None, help='only the first N validation records')
    ap.add_argument('--json', help='also write the figures to this JSON file')
    a = ap.parse_args()
    run = Path(a.run)
    cfg, records, data = run_inputs(run, a.limit)
    prompts = [r['prompt'] for r in records]
    model, tok = load_model(str(run/'lora_adapter'), merge=torch.cuda.is_available())
    if torch.cuda.is_available(): model.to('cuda')
    print(f"{len(prompts)} validation prompts of {data.parent.name}; student on {model.device}; "
          f"max_new_tokens {cfg['max_new_tokens']}, batch {cfg['gen_batch_size']}", flush=True)
    ways, answers, figures = {'one by one, eager': dict(batch_size=1, compile=False),
                              'batched, compiled': dict(batch_size=cfg['gen_batch_size'], compile=True)}, {}, {}
    for name, kw in ways.items():
        stats = {}
        answers[name] = generate_answers(model, tok, prompts, max_new_tokens=cfg['max_new_tokens'], prefill='padded',
                                         stats=stats, desc=name, **kw)
        figures[name] = {'seconds': round(stats['seconds'], 1), 'tokens_per_s': round(stats['new_tokens']/stats['seconds'], 1)}
    one, many = answers.values()
    same = sum(x == y for x, y in zip(one, many))
    diffs = [first_difference(*encode_prompts(tok, [x, y], 'raw')) for x, y in zip(one, many) if x != y]
    print(f"identical answers: {same}/{len(one)} ({same/len(one):.1%}); first differing token of the others: "
          f"{sorted(diffs) if diffs else '-'}")
    scores = {name: score_answers(ans, records, embed_model=False) for name, ans in answers.items()}
    keys = [k for k, v in scores['one by one, eager'].items() if isinstance(v, (int, float))]
    print(f"| metric | {' | '.join(ways)} | difference |\n|---|---|---|---|")
    for k in keys:
        x, y = (scores[n][k] for n in ways)
        print(f"| {k} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")
    for name, f in figures.items(): print(f"{name}: {f['seconds']} s, {f['tokens_per_s']} tokens/s")
    if a.json:
        Path(a.json).write_text(json.dumps({'n': len(one), 'identical': same, 'first_difference': diffs, 'time': figures,
                                            'scores': {n: {k: s[k] for k in keys} for n, s in scores.items()}}, indent=1))


if __name__ == '__main__':
    main()

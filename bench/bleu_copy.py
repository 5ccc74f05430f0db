"""How much BLEU the tuned embedded student loses by not copying the numbers its prompt already holds (#13).

    python bench/bleu_copy.py runs/quickstart [--out nbs/results/bleu_copy.json]

The seed's prompt ends with the window's change (`涨跌幅: +11.99%`) and its bars end with the last close; the rule
teacher quotes both (`累计涨幅11.99%`, `收于6.35元`). This script answers the run's validation prompts again with the
run's adapter (greedy, as the evaluation does: the same answers and scores), counts how often the student wrote each of
the two numbers exactly, and scores the answers as generated, with the prompt's change copied in, then also the last
close, then also the exact MA5/MA10 (computed from the closes, as `bench/bleu_numbers.py` does: not in the prompt)."""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from answer_agreement import run_inputs
from bleu_numbers import exact_ma
from stockdistill.evaluate import score_answers
from stockdistill.generate import generate_answers, load_model, load_student
from stockdistill.prompt import parse_prompt

CHANGE = re.compile(r'累计(涨幅|跌幅)(\d+\.\d+)%')
CLOSE = re.compile(r'收于(\d+\.\d+)元')


def prompt_numbers(prompt:str) -> tuple:
    "The window's change as the prompt prints it ('+11.99') and the window's closes."
    return re.search(r'涨跌幅: ([+-]?\d+\.\d+)%', prompt).group(1), parse_prompt(prompt)[1]['close'].astype(float).to_numpy()


def copied(answer:str, prompt:str) -> dict:
    "The answer with the prompt's numbers put in: the window's change, then also the last close, then also MA5/MA10."
    change, closes = prompt_numbers(prompt)
    a = CHANGE.sub(lambda m: f"累计{'跌幅' if change.startswith('-') else '涨幅'}{change.lstrip('+-')}%", answer)
    b = CLOSE.sub(f"收于{closes[-1]:.2f}元", a)
    return {'change': a, 'change+close': b, 'change+close+MA5/MA10': exact_ma(b, closes)}


def copy_counts(answers:list, recs:list) -> dict:
    "How many answers quote the window's change and the close at all, and how many write them as the prompt has them."
    n = dict(change_quoted=0, change_copied=0, close_quoted=0, close_copied=0)
    for ans, r in zip(answers, recs):
        (change, closes), m, c = prompt_numbers(r['prompt']), CHANGE.search(ans), CLOSE.search(ans)
        n['change_quoted'] += bool(m); n['close_quoted'] += bool(c)
        n['change_copied'] += bool(m and m.group(2) == change.lstrip('+-'))
        n['close_copied'] += bool(c and abs(float(c.group(1)) - closes[-1]) < 1e-9)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run', help='a finished run folder of `stockdistill distill` (config.json, lora_adapter/, teachers/<name>/cleaned_val_*.jsonl)')
    ap.add_argument('--out', help='write the figures to this JSON file')
    a = ap.parse_args()
    run = Path(a.run)
    cfg, recs, _ = run_inputs(run)
    torch.set_num_threads(2)
    model, tok = load_model(str(run/'lora_adapter'))
    answers = generate_answers(model, tok, [r['prompt'] for r in recs], batch_size=cfg['gen_batch_size'],
                               max_new_tokens=cfg['max_new_tokens'])
    base = load_student(cfg['student'])
    before = generate_answers(*base, [r['prompt'] for r in recs], batch_size=cfg['gen_batch_size'], max_new_tokens=cfg['max_new_tokens'])
    ways = {'as generated': answers}
    for ans, r in zip(answers, recs):
        for k, v in copied(ans, r['prompt']).items(): ways.setdefault(k, []).append(v)
    out = {'run': str(run), 'n': len(recs), 'tuned': copy_counts(answers, recs), 'base': copy_counts(before, recs), 'scores': {}}
    for who in ('base', 'tuned'):
        c = out[who]
        print(f"{who:5s}: of {len(recs)} answers, {c['change_quoted']} quote a window change, {c['change_copied']} exactly the prompt's; "
              f"{c['close_quoted']} quote a close, {c['close_copied']} exactly the last one")
    for k, ans in ways.items():
        s = score_answers(ans, recs, embed_model=False, outcomes=False)
        out['scores'][k] = {m: round(s[m], 4) for m in ('bleu', 'rougeL')}
        print(f"  {k:24s} BLEU {s['bleu']:.4f}  ROUGE-L {s['rougeL']:.4f}")
    if a.out: Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


if __name__ == '__main__': main()

"""Where the embedded student's BLEU is lost (#13): the numbers, and whether the seed's indicators in the prompt help.

    python bench/bleu_numbers.py --answers RUN/answers.jsonl [--runs RUN ...] --out nbs/results/bleu_numbers.json

From one run's generated answers (a run of `bench/reasoning_experiment.py` keeps them in answers.jsonl): the mean
sentence BLEU against the teacher as generated, with the student's MA5/MA10 values replaced by the exact ones computed
from the prompt's closes (what a perfect copy from `--context indicators` would give), and with every number blanked
in both texts (what exact numbers everywhere would give); the same split by whether the direction agrees. From
`--runs` (quick-start runs with and without `--context indicators`, e.g. bench/variants_gpu.sh ind): their metrics.
"""
import argparse
import json
import re
from pathlib import Path
import numpy as np


def exact_ma(answer:str, closes) -> str:
    "The answer with every 'MA5 x' / 'MA10（x' value replaced by the mean of the last 5 / 10 closes."
    ma = {k: float(np.mean(closes[-k:])) for k in (5, 10)}
    for k in (5, 10): answer = re.sub(rf'MA{k}([ （])(\d+\.\d+)', lambda m: f"MA{k}{m.group(1)}{ma[k]:.2f}", answer)
    return answer


def blank(text:str) -> str: return re.sub(r'[+-]?\d+(\.\d+)?', '0', text)


def number_analysis(path) -> dict:
    from stockdistill.evaluate import answer_direction, bleu
    from stockdistill.prompt import parse_prompt
    rows = [json.loads(line) for line in open(path, encoding='utf-8')]
    asis, ma, blanked, agree = [], [], [], []
    for r in rows:
        closes = parse_prompt(r['prompt'])[1]['close'].astype(float).to_numpy()
        asis.append(bleu(r['after'], r['teacher'])); ma.append(bleu(exact_ma(r['after'], closes), r['teacher']))
        blanked.append(bleu(blank(r['after']), blank(r['teacher'])))
        agree.append(answer_direction(r['after']) == answer_direction(r['teacher']))
    m = lambda xs, sel=None: round(float(np.mean([x for x, s in zip(xs, agree) if sel is None or s == sel])), 4)
    return dict(answers=str(path), n=len(rows), agreement=m(agree), bleu=m(asis), bleu_exact_ma5_ma10=m(ma),
                bleu_numbers_blanked=m(blanked), bleu_when_agreeing=m(asis, True), bleu_when_disagreeing=m(asis, False),
                bleu_numbers_blanked_when_agreeing=m(blanked, True))


def run_row(run:Path) -> dict:
    cfg, m = (json.loads((run/f).read_text(encoding='utf-8')) for f in ('config.json', 'metrics.json'))
    a = m['after']
    return dict(run=run.name, seed=cfg.get('seed'), context=cfg.get('context') or '', n=m['n'],
                **{k: round(a[k], 4) for k in ('direction_agreement', 'bleu', 'rougeL', 'json_valid', 'fields_complete')},
                **{f'bleu_{f}': round(v['bleu'], 4) for f, v in a['per_field'].items()}, directions=a.get('directions'))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--answers', help="a run's answers.jsonl (prompt, teacher, after)")
    p.add_argument('--runs', nargs='*', default=[], help='quick-start run folders (config.json, metrics.json)')
    p.add_argument('--out', default='nbs/results/bleu_numbers.json')
    p.add_argument('--note', default='')
    a = p.parse_args()
    res = dict(note=a.note, numbers=number_analysis(a.answers) if a.answers else None, runs=[run_row(Path(r)) for r in a.runs])
    Path(a.out).write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding='utf-8')
    print(json.dumps(res, ensure_ascii=False, indent=1))


if __name__ == '__main__': main()

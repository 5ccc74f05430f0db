"""Collect the SFT-vs-KD experiment of 05c_kd (issue #16) from trained, calibrated run folders into one JSON.

Usage: .venv/bin/python bench/kd_experiment.py RUN [RUN ...] --out nbs/results/kd_embedded [--generate N]
Each RUN is a `stockdistill distill` run folder whose adapter was calibrated with `python -m stockdistill.kd calibrate RUN`.
Per run: steps, training wall time and tokens/s, eval loss; from the calibration's per-window up/down/flat probabilities
(no generation needed) the argmax direction's agreement with the teacher's label and its accuracy/MCC against the
realized direction; ECE/Brier/NLL before and after temperature scaling; with `--generate N` the text metrics (BLEU,
ROUGE-L, embedding, JSON validity) and the generated answers' agreement/accuracy/MCC on the first N validation windows;
the pipeline's own metrics.json figures when the run has them.
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

DIRECTIONS = ('up', 'down', 'flat')
r4 = lambda v: None if v is None else round(float(v), 4)


def row(run: Path, generate: int = 0) -> dict:
    from stockdistill.dataset import read_jsonl
    from stockdistill.evaluate import answer_direction, direction_scores
    s = json.loads((run/'lora_adapter'/'train_summary.json').read_text(encoding='utf-8'))
    cal = json.loads((run/'calibration.json').read_text(encoding='utf-8'))
    probs = json.loads((run/'calibration_probs.json').read_text(encoding='utf-8'))
    val = {r['id']: r for r in read_jsonl(s['val_data'])}
    pred = [DIRECTIONS[max(range(3), key=lambda i: p['raw'][i])] for p in probs]
    teacher = [answer_direction(val[p['id']]['label']) for p in probs]
    real = direction_scores([p['y'] for p in probs], pred)
    kd = s.get('kd') or {}
    out = dict(run=run.name, method=s['method'], steps=s['steps'], train_s=s['wall_s'], train_tokens_per_s=s['tokens_per_s'],
               eval_loss=r4(s.get('eval_loss')), n=len(probs),
               prob_agreement=r4(sum(a == b for a, b in zip(pred, teacher))/len(pred)), prob_accuracy=r4(real['accuracy']),
               prob_mcc=r4(real['mcc']), prob_directions={d: pred.count(d) for d in DIRECTIONS},
               ece_raw=cal['raw']['ece'], ece_scaled=cal['scaled']['ece'], brier_raw=cal['raw']['brier'],
               brier_scaled=cal['scaled']['brier'], nll_raw=cal['raw']['nll'], nll_scaled=cal['scaled']['nll'],
               temperature=cal['temperature'], temperatures=cal.get('temperatures'), phrase_mass=cal['mass'],
               mean_probs=cal['mean_probs'], calibration_split=cal['split'], calibration_note=cal.get('note'),
               kd={k: v for k, v in kd.items() if k in ('teacher', 'logits', 'alpha', 'temperature', 'loss', 'beta', 'lmbda',
                                                      'seq_kd', 'batches', 'init_adapter', 'hidden_pairs')})
    if (run/'metrics.json').exists():
        a = json.loads((run/'metrics.json').read_text(encoding='utf-8'))['after']
        out['pipeline'] = {k: r4(a.get(k)) for k in ('direction_agreement', 'accuracy', 'mcc', 'bleu', 'rougeL', 'embed', 'json_valid')}
    if generate:
        from stockdistill.evaluate import score_answers
        from stockdistill.generate import generate_answers, load_student
        recs = list(val.values())[:generate]
        model, tok = load_student(adapter=run/'lora_adapter')
        t0 = time.time()
        answers = generate_answers(model, tok, [r['prompt'] for r in recs], batch_size=len(recs), max_new_tokens=160)
        m = score_answers(answers, recs)
        out['generated'] = dict(n=len(recs), seconds=round(time.time() - t0, 1),
                                **{k: r4(m.get(k)) for k in ('direction_agreement', 'bleu', 'rougeL', 'embed', 'json_valid')},
                                accuracy=r4(m.get('accuracy')), mcc=r4(m.get('mcc')))
        (run/f'generated_{generate}.json').write_text(json.dumps(dict(ids=[r['id'] for r in recs], answers=answers, metrics=out['generated']),
                                                             ensure_ascii=False), encoding='utf-8')
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--out', default='nbs/results/kd_embedded')
    p.add_argument('--generate', type=int, default=0, help='also generate answers on the first N validation windows')
    p.add_argument('--note', default='', help='how it was run (machine, load)')
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    rows = [row(Path(r), a.generate) for r in a.runs]
    for r in map(Path, a.runs):   # the reliability diagrams, small PNGs
        if (r/'reliability.png').exists(): shutil.copy(r/'reliability.png', out/f'{r.name}_reliability.png')
    Path(f'{out}.json').write_text(json.dumps(dict(note=a.note, cores=os.cpu_count(), rows=rows), ensure_ascii=False, indent=1),
                                   encoding='utf-8')
    for r in rows: print(json.dumps(r, ensure_ascii=False))


if __name__ == '__main__':
    main()

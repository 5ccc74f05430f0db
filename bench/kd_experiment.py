"""Collect the SFT-vs-KD experiment of 05c_kd (issue #16) from finished run folders into one JSON (and a compare page).

Usage: .venv/bin/python bench/kd_experiment.py RUN [RUN ...] --out nbs/results/kd_embedded
Each RUN is a `stockdistill distill` run folder, calibrated with `python -m stockdistill.kd calibrate RUN`.
Writes OUT.json (one row per run: steps, training wall time and tokens/s, eval loss, the text metrics, agreement with
the teacher, realized accuracy/MCC, calibration before/after temperature scaling) and OUT/compare.{html,json}.
"""
import argparse
import json
import os
import shutil
from pathlib import Path


def row(run: Path) -> dict:
    m = json.loads((run/'metrics.json').read_text(encoding='utf-8'))
    s = json.loads((run/'lora_adapter'/'train_summary.json').read_text(encoding='utf-8'))
    cfg = json.loads((run/'config.json').read_text(encoding='utf-8'))
    a, cal, kd = m['after'], m.get('calibration') or {}, s.get('kd') or {}
    r3 = lambda v: None if v is None else round(float(v), 4)
    return dict(run=run.name, method=s['method'], steps=s['steps'], train_s=s['wall_s'], train_tokens_per_s=s['tokens_per_s'],
                eval_loss=r3(s.get('eval_loss')), agreement=r3(a['direction_agreement']), accuracy=r3(a['accuracy']),
                mcc=r3(a['mcc']), bleu=r3(a['bleu']), rougeL=r3(a['rougeL']), embed=r3(a['embed']),
                json_valid=r3(a['json_valid']), directions=a['directions'],
                ece_raw=(cal.get('raw') or {}).get('ece'), ece_scaled=(cal.get('scaled') or {}).get('ece'),
                brier_raw=(cal.get('raw') or {}).get('brier'), brier_scaled=(cal.get('scaled') or {}).get('brier'),
                nll_raw=(cal.get('raw') or {}).get('nll'), nll_scaled=(cal.get('scaled') or {}).get('nll'),
                prob_accuracy=(cal.get('raw') or {}).get('accuracy'), temperature=cal.get('temperature'),
                phrase_mass=cal.get('mass'), calibration_split=cal.get('split'), calibration_note=cal.get('note'),
                kd={k: v for k, v in kd.items() if k in ('teacher', 'logits', 'alpha', 'temperature', 'loss', 'beta', 'lmbda',
                                                       'seq_kd', 'batches', 'init_adapter', 'hidden_pairs')},
                n=m['n'], split=m['split'], epochs=cfg.get('epochs'), before=dict(agreement=r3(m['before']['direction_agreement']),
                                                                              accuracy=r3(m['before']['accuracy'])),
                teacher_accuracy=r3(m['teacher']['accuracy']), teacher_mcc=r3(m['teacher']['mcc']),
                baselines={k: r3(v['accuracy']) for k, v in m['baselines'].items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--out', default='nbs/results/kd_embedded')
    p.add_argument('--note', default='', help='how it was run (machine, load)')
    a = p.parse_args()
    runs = [Path(r) for r in a.runs]
    out = Path(a.out)
    rows = [row(r) for r in runs]
    from stockdistill.report import compare_runs
    compare_runs(runs, out)
    for r in runs:   # the reliability diagrams, small PNGs
        if (r/'reliability.png').exists(): shutil.copy(r/'reliability.png', out/f'{r.name}_reliability.png')
    Path(f'{out}.json').write_text(json.dumps(dict(note=a.note, cores=os.cpu_count(), rows=rows), ensure_ascii=False, indent=1),
                                   encoding='utf-8')
    for r in rows: print({k: r[k] for k in ('run', 'steps', 'train_s', 'agreement', 'accuracy', 'mcc', 'bleu', 'ece_raw', 'ece_scaled')})


if __name__ == '__main__':
    main()

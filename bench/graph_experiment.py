"""The graph-retrieval experiment of 02a_graph: retrieval none/local/global/both, with the rule and rule-graph teachers.

Each condition is one pipeline run (`run_distill`) on the same windows: a fixed --window and no --max-tokens, so the
teacher and the student see the same bars in every condition and the context is the only difference. The script adds
what a run does not measure itself (the graph's build and query time, the prompt tokens the context adds, whether
the label lines carry each prompt's context, and how well the context's own numbers predict the realized moves) and
writes one JSON that the notebook shows.

Usage: .venv/bin/python bench/graph_experiment.py [--out nbs/results/graph_experiment.json] [--prefix graph]
           [--only none:rule,local:rule,global:rule] [--collect] [distill flags, e.g. --student tiny --lr 3e-3]
The defaults are the embedded student's 30-day prompts: --windows 16 --max-new-tokens 160 --gen-batch-size 66.
"""
import argparse
import json
from collections import Counter
import os
import platform
import sys
import time
from pathlib import Path

CONDITIONS = [('none', 'rule'), ('local', 'rule'), ('global', 'rule'), ('both', 'rule'),
              ('local', 'rule-graph'), ('global', 'rule-graph'), ('both', 'rule-graph')]
DEFAULTS = ['--windows', '16', '--max-new-tokens', '160', '--gen-batch-size', '66', '--overwrite']


def machine() -> str:
    "Cores and accelerator of this machine, in words."
    import torch
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ', no GPU'
    return f"{os.cpu_count()} CPU cores ({platform.machine()}){gpu}, load average {os.getloadavg()[0]:.1f} at the start"


def build_cost(cfg, tokenizer) -> tuple[dict, dict]:
    "Build the run's prompts once on a fresh market: (wall time, graph builds and queries, prompt and context length; the dataset)."
    from stockdistill import graph
    from stockdistill.dataset import SPLITS, build_dataset
    from stockdistill.prompt import count_tokens, prompt_context
    graph._MARKETS.clear()
    t = time.perf_counter()
    ds = build_dataset(cfg, tokenizer=tokenizer, verbose=False)
    wall = time.perf_counter() - t
    st = next(iter(graph._MARKETS.values())).stats if graph._MARKETS else dict(builds=0, build_s=0, queries=0, query_s=0)
    recs = [r for s in SPLITS for r in ds[s]]
    ctx = [r['prompt'][:len('\n'.join(r['context'])) + 1] if r.get('context') else '' for r in recs]
    tokens = [count_tokens(r['prompt'], tokenizer) for r in recs]
    bare = [count_tokens(r['prompt'][len(c):], tokenizer) for r, c in zip(recs, ctx)]
    mean = lambda xs: sum(xs)/len(xs) if xs else 0.0
    return dict(build_s=round(wall, 2), graph_builds=st['builds'], graph_build_s=round(st['build_s'], 2),
                graph_queries=st['queries'], query_ms=round(1000*st['query_s']/max(1, st['queries']), 2),
                with_context=round(mean([bool(c) for c in ctx]), 3), prompt_chars=round(mean([len(r['prompt']) for r in recs]), 1),
                context_chars=round(mean([len(c) for c in ctx]), 1), prompt_tokens=round(mean(tokens), 1),
                tokens_added=round(mean([a - b for a, b in zip(tokens, bare)]), 1),
                max_prompt_tokens=max(tokens), counted='characters' if tokenizer is None else 'tokens',
                graph_max_tokens=cfg.settings(graph.GraphSettings).graph_max_tokens,
                graph_counted='characters' if graph.context_tokenizer(cfg) is None else 'tokens',
                with_region_line=round(mean([bool(graph._CONTEXT_MOVES['region'].search(prompt_context(r['prompt']))) for r in recs]), 3)), ds


def labels_carry_context(cfg, teacher:str) -> bool:
    "Whether every label line of the run's training prompts carries exactly its prompt's context blocks."
    from stockdistill.dataset import read_jsonl
    from stockdistill.teacher import teacher_name
    prompts = {r['id']: r.get('context') for r in read_jsonl(cfg.prompts_file('train'))}
    lines = [r for r in read_jsonl(cfg.labels_file('train', teacher_name(teacher))) if r.get('id') in prompts]
    return bool(lines) and all(r.get('context') == prompts[r['id']] for r in lines)


def same_labels(cfg, teacher:str, other, other_teacher:str='rule', key=None) -> float|None:
    "Share of the run's training windows (code, end) whose answer (or `key(answer)`) equals the `other` run's for the same window (None without it)."
    from stockdistill.dataset import read_jsonl
    from stockdistill.teacher import teacher_name
    def answers(c, t):
        f = c.labels_file('train', teacher_name(t))
        return {(r.get('code'), r.get('end')): r.get('label') for r in read_jsonl(f)} if f.exists() else {}
    a, b = answers(cfg, teacher), answers(other, other_teacher)
    both = [k for k in a if k in b]
    key = key or (lambda x: x)
    return round(sum(key(a[k]) == key(b[k]) for k in both)/len(both), 4) if both else None


def compare_labels(cfg, teacher:str, none) -> tuple:
    "(answers, verdicts) equal to the no-retrieval run's, as shares of the training windows."
    from stockdistill.evaluate import answer_direction
    return same_labels(cfg, teacher, none), same_labels(cfg, teacher, none, key=answer_direction)


def row(cfg, retrieval:str, teacher:str, metrics:dict, cost:dict, labels_as_none=None, verdicts_as_none=None) -> dict:
    "One line of the results table."
    a, b, t = metrics['after'], metrics['before'], metrics.get('teacher', {})
    if b.get('json_valid') == 0 and not any(r.get('before') not in (None, 'unknown') for r in metrics.get('records', [])): b = {}   # --skip-base
    pick = lambda d, k: None if d.get(k) is None else round(d[k], 4)
    return dict(run=cfg.run_name, retrieval=retrieval, teacher=teacher, n_val=metrics['n'],
                teacher_acc=pick(t, 'accuracy'), teacher_mcc=pick(t, 'mcc'),
                student_acc=pick(a, 'accuracy'), student_mcc=pick(a, 'mcc'), base_acc=pick(b, 'accuracy'), base_mcc=pick(b, 'mcc'),
                base_agreement=pick(b, 'direction_agreement'),
                agreement=pick(a, 'direction_agreement'), bleu=pick(a, 'bleu'), rougeL=pick(a, 'rougeL'),
                embed=pick(a, 'embed'), json_valid=pick(a, 'json_valid'),
                **{k: cost[k] for k in ('tokens_added', 'prompt_tokens', 'build_s', 'graph_builds', 'graph_build_s', 'query_ms')},
                labels_carry_context=labels_carry_context(cfg, teacher), labels_as_none=labels_as_none, verdicts_as_none=verdicts_as_none,
                teacher_dirs=dict(Counter(r['teacher'] for r in metrics.get('records', []))), student_dirs=a.get('directions'),
                seconds={k: v for k, v in metrics.get('stage_seconds', {}).items() if k in ('label', 'train', 'evaluate', 'total')})


def skip_base_generation():
    "Make the evaluation answer '' for the base model instead of generating (the tuned model is generated as before)."
    import stockdistill.generate as g
    real = g.generate_answers
    def generate_answers(model, tok, prompts, *a, desc=None, **kw):
        return [''] * len(prompts) if desc == 'base model' else real(model, tok, prompts, *a, desc=desc, **kw)
    g.generate_answers = generate_answers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='nbs/results/graph_experiment.json', help='results JSON to write')
    p.add_argument('--prefix', default='graph', help='run names are <prefix>-<retrieval>-<teacher>')
    p.add_argument('--only', default='', help='comma-separated retrieval:teacher conditions (default: all seven)')
    p.add_argument('--skip-base', action='store_true', help="do not generate with the untuned base model (its columns stay empty): saves a third of the evaluation")
    p.add_argument('--collect', action='store_true', help="rebuild the table from the runs' metrics.json, keeping --out's costs and signal")
    args, distill_flags = p.parse_known_args(argv)
    from stockdistill.config import add_config_args, config_from_args
    from stockdistill.distill import run_distill, student_tokenizer
    from stockdistill.graph import signal_table
    flags = DEFAULTS + distill_flags
    base = config_from_args(add_config_args(argparse.ArgumentParser()).parse_args(flags))
    conds = [tuple(c.split(':')) for c in args.only.split(',') if c] or CONDITIONS
    out = Path(args.out)
    res = dict(command='python bench/graph_experiment.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
               flags=flags, machine=machine(), student=base.student, runs=[], costs={}, signal={})
    if args.collect:
        old = json.loads(out.read_text(encoding='utf-8'))
        res.update({k: old[k] for k in ('command', 'flags', 'machine', 'costs', 'signal')})
    tok = student_tokenizer(base)
    if args.skip_base: skip_base_generation()
    none = base.replace(run_name=f'{args.prefix}-none-rule', retrieval='none', teacher='rule')   # the no-retrieval run
    for retrieval, teacher in conds:
        cfg = base.replace(run_name=f'{args.prefix}-{retrieval}-{teacher}', retrieval=retrieval, teacher=teacher)
        if args.collect:
            res['runs'].append(row(cfg, retrieval, teacher, json.loads(cfg.metrics_file.read_text()), res['costs'][retrieval],
                                   *compare_labels(cfg, teacher, none)))
            continue
        print(f"=== {cfg.run_name}", flush=True)
        if retrieval not in res['costs']: res['costs'][retrieval] = build_cost(cfg, tok)[0]
        metrics = run_distill(cfg, report=True)['metrics']
        res['runs'].append(row(cfg, retrieval, teacher, metrics, res['costs'][retrieval], *compare_labels(cfg, teacher, none)))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding='utf-8')   # after every run: partial results survive
        print(json.dumps(res['runs'][-1], ensure_ascii=False), flush=True)
    if not args.collect and not res['signal']:   # what the context's own numbers say, read from both blocks' prompts
        res['costs']['both'], ds = build_cost(base.replace(retrieval='both'), tok)
        for split in ('train', 'val'):
            res['signal'][split] = json.loads(signal_table(ds[split], base.flat_band).round(4).to_json(orient='index'))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding='utf-8')
    print(f"results → {out}")


if __name__ == '__main__': main()

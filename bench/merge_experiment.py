"""The experiment of 05d_merge: regime experts (trend / range windows), the single adapter on all windows, every PEFT
merge method, the LoRA mixture (top-1, top-2) and mergekit's full Qwen2-MoE, all evaluated on the same validation windows; one compare page and
nbs/results/merge_experiment.json.

    python bench/merge_experiment.py                      # the quick start's data (16 windows x 40 stocks), CPU or CUDA
    python bench/merge_experiment.py --device cuda        # on a GPU box (the lead's run)
    python bench/merge_experiment.py --summarise-only     # rebuild the JSON from finished runs

Runs that already have metrics.json are kept (the script resumes); --fresh starts over.
"""
import argparse, json, os, shutil, subprocess, sys, time
from collections import Counter
from pathlib import Path

MERGES = ('linear', 'cat', 'ties', 'dare_ties', 'dare_linear', 'magnitude_prune')
PRUNING = ('ties', 'dare_ties', 'dare_linear', 'magnitude_prune')

def sd(args, env):
    "Run one `stockdistill` command in a child process, its output streamed; stop the experiment if it fails."
    print('$ stockdistill ' + ' '.join(args), flush=True)
    subprocess.run([sys.executable, '-m', 'stockdistill.cli', *args], check=True, env=env)

def regimes(run:Path, cut:float) -> dict:
    "{id: 'trend' | 'range'} of the run's validation prompts."
    from stockdistill.dataset import read_jsonl
    from stockdistill.merge import window_regime
    return {r['id']: window_regime(r['prompt'], cut) for r in read_jsonl(run/'prompts_val.jsonl')}

def routing(run:Path, cut:float) -> dict:
    "Which expert a mixture's router picks (top-1) for the trend and for the range validation windows."
    import torch
    from stockdistill.dataset import read_jsonl
    from stockdistill.merge import load_moe, pooled_states, window_regime
    model, tok, names, router = load_moe(run/'lora_adapter')
    recs = read_jsonl(run/'prompts_val.jsonl')
    with torch.no_grad(): gates = router(pooled_states(model, tok, [r['prompt'] for r in recs]))[1]
    src = [Path(s).parent.name for s in json.loads((run/'lora_adapter'/'moe.json').read_text())['sources']]
    out = Counter((window_regime(r['prompt'], cut), src[int(g.argmax())]) for r, g in zip(recs, gates))
    return {f'{reg}->{e}': n for (reg, e), n in sorted(out.items())}

def row(run:Path, reg:dict) -> dict:
    "The figures of one run: text, structure, agreement (all / trend / range windows), realized, size and speed."
    m = json.loads((run/'metrics.json').read_text())
    s = json.loads((run/'lora_adapter'/'train_summary.json').read_text())
    a = m['after']
    by = {k: [r for r in m['records'] if reg.get(r['id']) == k] for k in ('trend', 'range')}
    agree = lambda rs: round(sum(r['after'] == r['teacher'] for r in rs)/len(rs), 4) if rs else None
    tps = a.get('tokens_per_answer', 0)/a['seconds_per_answer'] if a.get('seconds_per_answer') else None
    return dict(run=run.name, method=s.get('method'), n=m['n'], agreement=round(a['direction_agreement'], 4),
                agreement_trend=agree(by['trend']), agreement_range=agree(by['range']), n_trend=len(by['trend']), n_range=len(by['range']),
                json_valid=a['json_valid'], fields_complete=a['fields_complete'], bleu=round(a['bleu'], 4), rougeL=round(a['rougeL'], 4),
                embed=round(a['embed'], 4) if a.get('embed') is not None else None, accuracy=a.get('accuracy'), mcc=a.get('mcc'),
                directions=a.get('directions'), train_examples=s.get('train_examples'), steps=s.get('steps'), train_s=s.get('wall_s'),
                adapter_params=s.get('trainable_params'), total_params=s.get('total_params'), lora_r=s.get('lora_r'),
                weights=s.get('weights'), density=s.get('density'), seconds_per_answer=round(a.get('seconds_per_answer') or 0, 4),
                tokens_per_answer=round(a.get('tokens_per_answer') or 0, 1), answer_tokens_per_s=round(tps, 1) if tps else None,
                evaluate_s=(m.get('stage_seconds') or {}).get('evaluate'))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs-dir', default='runs'); p.add_argument('--prefix', default='mx', help='run names start with this')
    p.add_argument('--windows', type=int, default=16); p.add_argument('--max-new-tokens', type=int, default=160)
    p.add_argument('--gen-batch-size', type=int, default=66); p.add_argument('--density', type=float, default=0.5)
    p.add_argument('--moe-steps', type=int, default=60); p.add_argument('--regime-cut', type=float, default=0.2)
    p.add_argument('--device', choices=('cpu', 'cuda'), default=None, help='cpu hides the GPUs (default: CUDA when there is one)')
    p.add_argument('--extra', default='', help='more flags for the expert runs, e.g. "--embed-model off"')
    p.add_argument('--out', default='nbs/results/merge_experiment.json'); p.add_argument('--fresh', action='store_true')
    p.add_argument('--summarise-only', action='store_true')
    a = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    if a.device == 'cpu': env['CUDA_VISIBLE_DEVICES'] = ''
    R, X = Path(a.runs_dir), a.prefix
    names = [X, f'{X}-trend', f'{X}-range', *[f'{X}-{m}' for m in MERGES], f'{X}-moe1', f'{X}-moe2', f'{X}-mergekit']
    if a.fresh:
        for n in names: shutil.rmtree(R/n, ignore_errors=True)
    common = ['--runs-dir', str(R)]
    t0 = time.time()
    if not a.summarise_only:
        if not all((R/n/'metrics.json').exists() for n in names[:3]):
            sd(['experts', '--run-name', X, '--expert-split', 'regime', '--regime-cut', str(a.regime_cut), '--windows', str(a.windows),
                '--max-new-tokens', str(a.max_new_tokens), '--gen-batch-size', str(a.gen_batch_size), *common, *a.extra.split()], env)
        experts = f'{X}-trend,{X}-range'
        for m in MERGES:
            if not (R/f'{X}-{m}'/'metrics.json').exists():
                sd(['merge', '--experts', experts, '--method', m, '--run-name', f'{X}-{m}', *common,
                    *(['--density', str(a.density)] if m in PRUNING else [])], env)
        for k in (1, 2):
            if not (R/f'{X}-moe{k}'/'metrics.json').exists():
                sd(['merge', '--experts', experts, '--method', 'lora-moe', '--moe-top-k', str(k), '--moe-steps', str(a.moe_steps),
                    '--run-name', f'{X}-moe{k}', *common], env)
        if not (R/f'{X}-mergekit'/'metrics.json').exists():   # a full Qwen2-MoE (needs the mergekit package)
            sd(['merge', '--experts', experts, '--method', 'mergekit-moe', '--run-name', f'{X}-mergekit', *common], env)
        sd(['compare', *[str(R/n) for n in names], '--out', str(R/f'{X}-compare')], env)
    reg = regimes(R/X, a.regime_cut)
    rows = [row(R/n, reg) for n in names if (R/n/'metrics.json').exists()]
    m0 = json.loads((R/X/'metrics.json').read_text())
    res = dict(rows=rows, routing={n: routing(R/n, a.regime_cut) for n in names if n.startswith(f'{X}-moe') and (R/n/'metrics.json').exists()},
               val_regimes=dict(Counter(reg.values())), before=dict(agreement=m0['before']['direction_agreement'], bleu=m0['before']['bleu']),
               teacher=m0.get('teacher'), baselines=m0.get('baselines'), settings=vars(a), wall_s=round(time.time() - t0, 1),
               compare=str(R/f'{X}-compare'/'compare.json'),
               note=("every run scored on the same validation windows against the same teacher (rule, balanced); wall times "
                    "are those of a shared 2-core CPU (nice 19), comparable only roughly"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding='utf-8')
    print(f"wrote {a.out} ({len(rows)} runs)")

if __name__ == '__main__': main()

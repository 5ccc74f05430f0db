"""The RL experiment of 05e_rl (issue #19): SFT vs SFT→GRPO (ours) vs the seed's control vs outcome-tagged SFT.

Usage (CPU, the embedded student; ~55 min on 2 cores shared with other jobs, most of it the GRPO and control arms):
  .venv/bin/python bench/rl_experiment.py --run runs/rl_sft --out nbs/results/rl_experiment.json
  .venv/bin/python bench/rl_experiment.py --run runs/rl_sft --device cuda --grpo-steps 200 ...   # on a GPU

1. the SFT run (made here when `RUN/lora_adapter` is missing): `stockdistill distill` with the quick start's student and
   teacher, `--windows 16 --val-ratio 0.1 --test-ratio 0.1` (the training period is the quick start's, so the shipped
   base never saw a validation or test window; the quick start's validation period is split into validation and test);
2. four adapters trained in the same run folder from its SFT adapter / labels:
   grpo (ours: format + correctness + language rewards, β = --kl-beta), grpo-strong-kl (β = --kl-beta-strong),
   control (the seed's: word prompt, correctness only, β = 0), tags (`--method outcome-tags`, the SFT recipe on
   hindsight-tagged inputs); and the S3-style searcher (`--only searcher`, seconds);
3. every adapter answers the validation and test windows (greedy, 160 new tokens, each with its own answer function),
   scored against the teacher's labels and the realized moves (accuracy, MCC, confusion), with the language figures
   of 05e_rl; the control also answers its own word prompt.
"""
import argparse
import json
import os
import time
from pathlib import Path

r4 = lambda v: None if v is None else round(float(v), 4)


def sft_run(run: Path):
    "The SFT run's config, made (build, label, clean, train, evaluate) when its adapter is missing."
    from stockdistill.config import DistillConfig, load_config
    if (run/'lora_adapter'/'adapter_model.safetensors').exists():
        return load_config(run/'config.json', run_name=run.name, runs_dir=str(run.parent))
    from stockdistill.distill import run_distill
    cfg = DistillConfig(run_name=run.name, runs_dir=str(run.parent), windows=16, val_ratio=0.1, test_ratio=0.1,
                        max_new_tokens=160, gen_batch_size=66, overwrite=True, embed_model='off')
    run_distill(cfg, report=False)
    return cfg


def evaluate_adapter(cfg, adapter: Path, files: dict, max_new_tokens: int = 160, batch_size: int = 66) -> dict:
    "Answers of `adapter` on each split (its own answer function), scored vs teacher and reality, with language figures."
    from stockdistill.dataset import read_jsonl
    from stockdistill.evaluate import score_answers
    from stockdistill.generate import answer_fn, load_student
    from stockdistill.rl import language_metrics
    model, tok = load_student(adapter=adapter)
    fn = answer_fn(cfg, adapter)
    out = {}
    for split, path in files.items():
        recs = read_jsonl(path)
        t0 = time.time()
        answers = fn(model, tok, [r['prompt'] for r in recs], batch_size=batch_size, max_new_tokens=max_new_tokens)
        m = score_answers(answers, recs, embed_model=False)
        out[split] = dict(n=len(recs), seconds=round(time.time() - t0, 1),
                          **{k: r4(m.get(k)) for k in ('direction_agreement', 'accuracy', 'mcc', 'bleu', 'rougeL', 'json_valid',
                                                      'fields_complete')},
                          directions=m['directions'], confusion=m.get('confusion'),
                          **{k: r4(v) for k, v in language_metrics(answers).items()},
                          samples=answers[:3])
    return out


def word_accuracy(adapter: Path, files: dict) -> dict:
    "The control on its own word prompt: share of 涨/跌 answers, and their accuracy against the sign of the realized return."
    from stockdistill.dataset import read_jsonl
    from stockdistill.generate import generate_answers, load_student
    from stockdistill.rl import rl_prompt, word_direction
    model, tok = load_student(adapter=adapter)
    out = {}
    for split, path in files.items():
        recs = read_jsonl(path)
        answers = generate_answers(model, tok, [rl_prompt(r['prompt'], 'word') for r in recs], batch_size=66, max_new_tokens=8)
        calls = [word_direction(a) for a in answers]
        sign = ['up' if r['outcome']['forward_return'] > 0 else 'down' for r in recs]
        out[split] = dict(n=len(recs), answered=r4(sum(c != 'unknown' for c in calls)/len(calls)),
                          accuracy=r4(sum(c == s for c, s in zip(calls, sign))/len(calls)),
                          up=calls.count('up'), down=calls.count('down'), samples=answers[:5])
    return out


def references(files: dict, train_path) -> dict:
    "The teacher's labels and the naive baselines on each split (accuracy/MCC), and the labels' language figures."
    from stockdistill.dataset import read_jsonl
    from stockdistill.evaluate import answer_direction, baseline_predictions, direction_scores, realized_directions
    from stockdistill.rl import language_metrics
    train_dirs = [d for d in realized_directions(read_jsonl(train_path)) if d]
    out = {}
    for split, path in files.items():
        recs = read_jsonl(path)
        y = realized_directions(recs)
        teacher = direction_scores(y, [answer_direction(r['label']) for r in recs])
        base = baseline_predictions([r['prompt'] for r in recs], y, train_dirs)
        out[split] = dict(teacher=dict(accuracy=r4(teacher['accuracy']), mcc=r4(teacher['mcc']), confusion=teacher['confusion'],
                                       **{k: r4(v) for k, v in language_metrics([r['label'] for r in recs]).items()}),
                          realized={d: y.count(d) for d in ('up', 'down', 'flat')},
                          rose=r4(sum(r['outcome']['forward_return'] > 0 for r in recs)/len(recs)),   # the word prompt's 'always 涨'
                          **{k: dict(accuracy=r4(direction_scores(y, v)['accuracy']), mcc=r4(direction_scores(y, v)['mcc']))
                             for k, v in base.items()})
    return out


def run_searcher(run: Path, steps: int = 300, seed: int = 0) -> dict:
    "The S3-style searcher: which graph-retrieval blocks the frozen rule-graph generator gets, trained on training outcomes."
    import torch
    from stockdistill.config import DistillConfig
    from stockdistill.dataset import build_dataset, read_jsonl
    from stockdistill.evaluate import direction_scores
    from stockdistill.rl import (SEARCH_ACTIONS, TrainingOutcomes, generator_directions, search_features, search_gains,
                                 searcher_choices, train_searcher)
    cfg = DistillConfig(run_name=run.name + '_search', runs_dir=str(run.parent), windows=16, val_ratio=0.1, test_ratio=0.1,
                        options=dict(retrieval='both'))
    if not cfg.prompts_file('test').exists(): build_dataset(cfg, write=True)
    recs = {s: read_jsonl(cfg.prompts_file(s)) for s in ('train', 'val', 'test')}
    t0 = time.time()
    dirs = {s: generator_directions(r) for s, r in recs.items()}
    feats = {s: torch.tensor([search_features(x) for x in r]) for s, r in recs.items()}
    gains = search_gains(recs['train'], dirs['train'], TrainingOutcomes(recs['train']))
    policy, log = train_searcher(feats['train'], gains, steps=steps, seed=seed)
    out = dict(steps=steps, seconds=round(time.time() - t0, 1), generator='rule-graph', train_gain_by_action=
               {a: r4(g) for a, g in zip(SEARCH_ACTIONS, gains.mean(0).tolist())}, log=log[::10] + log[-1:])
    for s, r in recs.items():
        y = [x['outcome']['direction'] for x in r]
        choice = searcher_choices(policy, feats[s])
        row = {a: {k: r4(v) for k, v in direction_scores(y, [d[a] for d in dirs[s]]).items() if k in ('accuracy', 'mcc')}
               for a in SEARCH_ACTIONS}
        row['searcher'] = {k: r4(v) for k, v in direction_scores(y, [d[c] for d, c in zip(dirs[s], choice)]).items()
                           if k in ('accuracy', 'mcc')}
        row['searcher']['choices'] = {a: choice.count(a) for a in SEARCH_ACTIONS}
        row['oracle_accuracy'] = r4(sum(any(d[a] == t for a in SEARCH_ACTIONS) for d, t in zip(dirs[s], y))/len(y))
        row['n'] = len(y)
        out[s] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--run', default='runs/rl_sft', help='the SFT run folder (made when missing)')
    p.add_argument('--out', default='nbs/results/rl_experiment.json')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='cpu hides any GPU; cuda requires one')
    p.add_argument('--grpo-steps', type=int, default=40)
    p.add_argument('--control-steps', type=int, default=80, help="the seed's control (its answers are cut at --control-tokens: cheap steps)")
    p.add_argument('--control-tokens', type=int, default=32, help="tokens sampled per answer of the control (its call comes first)")
    p.add_argument('--grpo-prompts', type=int, default=4)
    p.add_argument('--grpo-group-size', type=int, default=4)
    p.add_argument('--kl-beta', type=float, default=0.04)
    p.add_argument('--kl-beta-strong', type=float, default=0.2, help="the 'grpo-strong-kl' arm's β (the leash tighter)")
    p.add_argument('--lr', type=float, default=3e-4)
    p.add_argument('--only', default='sft,grpo,grpo-strong-kl,control,tags,searcher', help='comma-separated arms to (re)train and evaluate')
    p.add_argument('--splits', default='val,test', help='splits every student answers (add train to see what RL fitted)')
    p.add_argument('--eval-only', action='store_true', help="evaluate the arms' existing adapters again, no training")
    p.add_argument('--note', default='', help='how it was run (machine, load)')
    a = p.parse_args()
    if a.device == 'cpu': os.environ['CUDA_VISIBLE_DEVICES'] = ''
    import torch
    if a.device == 'cuda' and not torch.cuda.is_available(): raise SystemExit('--device cuda: no GPU visible')
    from stockdistill.rl import SEED_CONTROL
    from stockdistill.train import METHODS, _default_path
    run = Path(a.run)
    t0 = time.time()
    cfg = sft_run(run)
    files = {s: _default_path(cfg, s) for s in a.splits.split(',')}
    res_path = Path(a.out)
    res = json.loads(res_path.read_text(encoding='utf-8')) if res_path.exists() else {}
    arms = [x.strip() for x in a.only.split(',') if x.strip()]
    init = str(run/'lora_adapter')
    common = dict(grpo_prompts=a.grpo_prompts, grpo_group_size=a.grpo_group_size, rl_init_adapter=init)
    specs = {
        'sft': None,
        'grpo': ('grpo', a.grpo_steps, dict(common, grpo_steps=a.grpo_steps, kl_beta=a.kl_beta)),
        'grpo-strong-kl': ('grpo', a.grpo_steps, dict(common, grpo_steps=a.grpo_steps, kl_beta=a.kl_beta_strong)),
        'control': ('grpo', a.control_steps, dict(common, grpo_steps=a.control_steps, grpo_max_new_tokens=a.control_tokens, **SEED_CONTROL)),
        'tags': ('outcome-tags', None, {}),
    }
    rows = res.get('rows', {})
    if 'searcher' in arms:
        arms.remove('searcher')
        print('[searcher] building the --retrieval both prompts, training', flush=True)
        res['searcher'] = run_searcher(run)
        print(json.dumps({s: res['searcher'][s] for s in ('train', 'val', 'test')}, ensure_ascii=False), flush=True)
    for arm in arms:
        t = time.time()
        if specs[arm] is None: acfg, adapter, train = cfg, run/'lora_adapter', json.loads((run/'lora_adapter'/'train_summary.json').read_text())
        else:
            method, _, opts = specs[arm]
            acfg = cfg.replace(method=method, out=f"{arm.replace('-', '_')}_adapter", overwrite=True, options=opts,
                               lr=a.lr if method == 'grpo' else cfg.lr)
            adapter = acfg.adapter_dir
            if a.eval_only: train = json.loads((adapter/'train_summary.json').read_text(encoding='utf-8'))
            else:
                print(f'[{arm}] training: method {method}, {opts}', flush=True)
                train = METHODS.get(method)(acfg, train_path=files_train(cfg), val_path=_default_path(cfg, 'val'), resume=False)
        print(f'[{arm}] evaluating {adapter}', flush=True)
        row = dict(arm=arm, method=train.get('method'), train_s=train.get('wall_s'), steps=train.get('steps'),
                   settings=train.get('settings'), reward_first=train.get('reward_first'), reward_last=train.get('reward_last'),
                   kl_last=train.get('kl_last'), log=train.get('log'), hindsight_labels=train.get('hindsight_labels', False),
                   outcome_tags=train.get('outcome_tags'), note=train.get('note'),
                   eval=evaluate_adapter(acfg, adapter, files))
        if arm in ('control', 'sft'): row['word_prompt'] = word_accuracy(adapter, files)
        if a.eval_only and arm in rows: row = dict(rows[arm], eval={**rows[arm]['eval'], **row['eval']},
                                                   word_prompt={**rows[arm].get('word_prompt', {}), **row.get('word_prompt', {})})
        else: row['seconds'] = round(time.time() - t, 1)
        rows[arm] = row
        res.update(rows=rows)
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding='utf-8')
        e = row['eval']
        print(json.dumps({arm: {s: {k: e[s][k] for k in ('direction_agreement', 'accuracy', 'mcc', 'json_valid', 'distinct_2',
                                                        'repetition', 'cjk_share', 'length')} for s in files}}, ensure_ascii=False), flush=True)
    res.update(note=a.note or res.get('note', ''), cores=os.cpu_count(), device=a.device, run=str(run),
               references={**res.get('references', {}), **references(files, files_train(cfg))},
               total_s=round(time.time() - t0 + res.get('total_s', 0), 1))
    if not a.eval_only or 'config' not in res:
        res['config'] = dict(grpo_steps=a.grpo_steps, control_steps=a.control_steps, control_tokens=a.control_tokens,
                             grpo_prompts=a.grpo_prompts, grpo_group_size=a.grpo_group_size, kl_beta=a.kl_beta,
                             kl_beta_strong=a.kl_beta_strong, lr=a.lr,
                             windows=cfg.windows, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio)
    res_path.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding='utf-8')
    print('wrote', res_path)


def files_train(cfg):
    from stockdistill.train import _default_path
    return _default_path(cfg, 'train')


if __name__ == '__main__':
    main()

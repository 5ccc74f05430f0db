"""Generation speed of the 05d_merge experiment's students on one machine, one after another (#18: "parameter count
and generation speed of each"); the experiment's own figures were taken under a changing load.

    python bench/merge_speed.py RUN [RUN ...] [--prompts 66] [--max-new-tokens 160] [--repeat 2] [--threads 2]
                                [--out nbs/results/merge_speed.json]

Each RUN is a run folder of the experiment (an adapter, a merged adapter, a LoRA mixture or a mergekit model). The
first `--prompts` validation prompts are answered in one batch, greedily, by the run's own answer function (the
mixture's router for a mixture: `generate.answer_fn`), `--repeat` times; the best time counts (`timeit`'s advice).
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--prompts', type=int, default=66); p.add_argument('--max-new-tokens', type=int, default=160)
    p.add_argument('--repeat', type=int, default=2); p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default='nbs/results/merge_speed.json')
    a = p.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from stockdistill.config import load_config
    from stockdistill.dataset import read_jsonl
    from stockdistill.evaluate import _resolve_model
    from stockdistill.generate import answer_fn
    rows = []
    for run in map(Path, a.runs):
        cfg = load_config(run/'config.json', run_name=run.name, runs_dir=str(run.parent))
        adapter = run/'lora_adapter'
        prompts = [r['prompt'] for r in read_jsonl(run/'prompts_val.jsonl')][:a.prompts]
        model, tok = _resolve_model(str(adapter), None)
        fn = answer_fn(cfg, adapter)
        best, stats = None, {}
        for _ in range(a.repeat):
            st = {}
            t = time.perf_counter()
            fn(model, tok, prompts, batch_size=len(prompts), max_new_tokens=a.max_new_tokens, stats=st)
            s = time.perf_counter() - t
            if best is None or s < best: best, stats = s, st
        params = sum(q.numel() for q in model.parameters())
        rows.append(dict(run=run.name, prompts=len(prompts), seconds=round(best, 2), new_tokens=stats.get('new_tokens'),
                         new_tokens_per_s=round(stats['new_tokens']/best, 1) if stats.get('new_tokens') else None,
                         answers_per_s=round(len(prompts)/best, 2), loaded_params=params))
        print(json.dumps(rows[-1]), flush=True)
        del model
    info = dict(machine=f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, {a.threads} threads",
                load_average=os.getloadavg(), argv=vars(a), rows=rows)
    Path(a.out).write_text(json.dumps(info, indent=1), encoding='utf-8')


if __name__ == '__main__': main()

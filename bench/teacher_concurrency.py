"""Labels per second of `label_samples` + `OpenAITeacher` at concurrency 1 (the seed's sequential loop) and 16.

Starts the test chat-completions server on 127.0.0.1 answering each request after DELAY seconds (a stand-in for a
slow teacher), labels N prompts at each concurrency into a fresh file, prints labels/s and the speed-up.

    python bench/teacher_concurrency.py [--n 200] [--delay 0.5] [--concurrency 1 16]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
from chat_server import ChatServer  # noqa: E402
from stockdistill.teacher import OpenAITeacher, label_samples  # noqa: E402


def labels_per_second(base_url: str, n: int, concurrency: int) -> tuple[float, int]:
    "Label `n` fresh prompts at `concurrency`; (labels/s, failures)."
    prompts = [f'bench c={concurrency} prompt {i}' for i in range(n)]
    teacher = OpenAITeacher(base_url, model='bench', concurrency=concurrency, timeout=30)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        out = label_samples(prompts, teacher, Path(d)/'labeled_data.jsonl', progress=False)
        elapsed = time.perf_counter() - t0
    assert len(out) == n
    return n/elapsed, sum(r['error'] is not None for r in out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=200, help='prompts per run')
    p.add_argument('--delay', type=float, default=0.5, help='seconds the server takes per answer')
    p.add_argument('--concurrency', type=int, nargs='+', default=[1, 16])
    a = p.parse_args()
    rates = {}
    with ChatServer(delay=a.delay) as srv:
        for c in a.concurrency:
            rates[c], failures = labels_per_second(srv.base_url, a.n, c)
            print(f'concurrency {c:>3}: {rates[c]:7.2f} labels/s  ({a.n} prompts, {a.delay:g} s per answer, '
                  f'{failures} failures, server saw at most {srv.max_inflight} in flight)', flush=True)
            srv.max_inflight = 0
    lo, hi = min(a.concurrency), max(a.concurrency)
    print(f'speed-up {hi} vs {lo}: {rates[hi]/rates[lo]:.1f}x (ideal {hi/lo:g}x)')


if __name__ == '__main__': main()

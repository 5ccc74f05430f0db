"""The multi-process code path on the CPU: torchrun (what `accelerate launch` runs under for GPUs) starts 2 processes
on the gloo backend, and they run the same `stockdistill` steps a GPU box runs under `accelerate launch
--config_file configs/accelerate/ddp_2gpu.yaml`: Accelerate's state and the HF Trainer read the same environment.
(Accelerate's own CPU multi-process launch needs mpirun, which this machine lacks.)"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def launch2():
    "torchrun with 2 processes on this machine (a fresh rendezvous port each time)."
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
            '--master_port', str(free_port())]
SMALL = ['--stock', '600031', '--stock', '000002', '--windows', '3', '--val-ratio', '0.34', '--max-tokens', '900']


def run(cmd, runs, *args):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([*cmd, *args[:1], '--runs-dir', str(runs), *args[1:]], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def lines(p):
    return [json.loads(line) for line in Path(p).read_text(encoding='utf-8').split('\n') if line.strip()]


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    "A tiny local HF model (random weights) to act as the teacher."
    from stockdistill.train import build_tiny_student
    d = tmp_path_factory.mktemp('teacher')/'tiny'
    build_tiny_student(['股票 600031 近30日K线数据 {"prediction": "上涨"}'] * 4, d, seed=0)
    return d


def test_hf_teacher_labels_are_sharded_and_merged_without_loss_or_duplicates(tmp_path, tiny_teacher):
    p = run([*launch2(), '-m', 'stockdistill.distill'], tmp_path, 'label', '--run-name', 'hf', *SMALL,
        '--teacher', f'hf:{tiny_teacher}', '--max-new-tokens', '8')
    run_dir = tmp_path/'hf'
    from stockdistill.config import slug
    teacher = run_dir/"teachers"/slug(f"hf:{tiny_teacher}")
    for split, name in (('train', 'labeled_data.jsonl'), ('val', 'val_labeled_data.jsonl')):
        prompts = [r['id'] for r in lines(run_dir/f'prompts_{split}.jsonl')]
        labels = lines(teacher/name)
        assert sorted(r['id'] for r in labels) == sorted(prompts) and len(prompts) > 1
        assert {r['teacher'] for r in labels} == {f'hf:{tiny_teacher}'}
    assert not list(run_dir.rglob('*.rank*.jsonl'))
    assert 'from 2 process(es)' in p.stdout


def test_training_under_accelerate_with_two_processes_saves_a_loadable_adapter(tmp_path):
    run([sys.executable, '-m', 'stockdistill.distill'], tmp_path, 'label', '--run-name', 'ddp', *SMALL)
    p = run([*launch2(), '-m', 'stockdistill.distill'], tmp_path, 'train', '--run-name', 'ddp', *SMALL,
            '--max-steps', '3')
    adapter = tmp_path/'ddp'/'lora_adapter'
    summary = json.loads((adapter/'train_summary.json').read_text())
    assert summary['processes'] == 2 and summary['steps'] == 3, p.stdout
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(summary['base']), str(adapter))
    assert sum('lora_' in n for n, _ in model.named_parameters()) > 0

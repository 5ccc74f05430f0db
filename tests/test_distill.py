"""End-to-end tests of the one-command pipeline: the real CLI in a subprocess, on the bundled data, with the tiny
student; the teacher is the rule teacher, or the real OpenAI client against the chat-completions server below."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer  # noqa: E402

SMALL = ['--stock', '600031', '--stock', '000002', '--windows', '3', '--val-ratio', '0.34', '--max-steps', '3',
         '--eval-limit', '2', '--max-new-tokens', '16']
SEED_LINES = (r"Before fine-tuning: bleu: \d\.\d{4}, rougeL: \d\.\d{4}, embed: -?\d\.\d{4}\n"
              r"After fine-tuning:  bleu: \d\.\d{4}, rougeL: \d\.\d{4}, embed: -?\d\.\d{4}")


def distill(runs, *args, check=True, env=None):
    "Run `python -m stockdistill.distill` in a fresh process; return the finished process."
    sub = list(args[:1]) if args and args[0] in ('distill', 'train', 'label', 'report') else []
    cmd = [sys.executable, '-m', 'stockdistill.distill', *sub, '--runs-dir', str(runs), *args[len(sub):]]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_jsonl(p):
    return [json.loads(line) for line in Path(p).read_text(encoding='utf-8').split('\n') if line.strip()]


def test_cli_end_to_end_writes_every_artifact(tmp_path):
    p = distill(tmp_path, '--run-name', 'e2e', *SMALL)
    assert re.search(SEED_LINES, p.stdout), p.stdout
    run = tmp_path/'e2e'
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['codes'] == ['600031', '000002'] and cfg['windows'] == 3 and cfg['teacher'] == 'rule'
    for split in ('train', 'val'):
        prompts = read_jsonl(run/f'prompts_{split}.jsonl')
        assert prompts and all(r['prompt'].startswith('股票 ') and r['outcome']['direction'] in ('up', 'down', 'flat')
                               for r in prompts)
    labels = read_jsonl(run/'labeled_data.jsonl')
    assert {r['teacher'] for r in labels} == {'rule'} and all(set(r['label']) >= {'prediction', 'analysis', 'advice'}
                                                              for r in labels)
    cleaned = read_jsonl(run/'cleaned_labeled_data.jsonl')
    assert len(cleaned) == len(labels) and all(isinstance(json.loads(r['label']), dict) for r in cleaned)
    assert read_jsonl(run/'cleaned_val_labeled_data.jsonl')
    assert (run/'tiny_base'/'config.json').exists() and (run/'tiny_base'/'tokenizer.json').exists()
    adapter = run/'lora_adapter'
    assert json.loads((adapter/'adapter_config.json').read_text())['peft_type'] == 'LORA'
    assert (adapter/'progress.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = json.loads((adapter/'train_summary.json').read_text())
    assert summary['steps'] == 3 and summary['train_examples'] == len(cleaned)
    metrics = json.loads((run/'metrics.json').read_text())
    for side in ('before', 'after'):
        assert all(0 <= metrics[side][k] <= 1 for k in ('bleu', 'rougeL', 'json_valid'))
        assert -1 <= metrics[side]['embed'] <= 1
    assert metrics['n'] == 2 and metrics['split'] == 'val'
    html = (run/'report.html').read_text(encoding='utf-8')
    assert 'Before fine-tuning:' in html and 'Plotly.newPlot' in html and '<script src="http' not in html
    assert str(run/'report.html') in p.stdout


def test_skip_teacher_without_labels_is_a_clear_error(tmp_path):
    p = distill(tmp_path, '--run-name', 'nolabels', '--skip-teacher', *SMALL, check=False)
    assert p.returncode == 2
    assert '--skip-teacher' in p.stderr and 'no labels' in p.stderr
    assert not (tmp_path/'nolabels'/'labeled_data.jsonl').exists()


def test_resume_after_labeling_pays_nothing_and_overwrite_relabels(tmp_path):
    with ChatServer() as srv:
        teacher = ['--teacher', srv.base_url, '--teacher-model', 'test-model']
        # 1. the run dies after labeling: the student path does not exist, so training fails
        p = distill(tmp_path, '--run-name', 'r', *SMALL, *teacher, '--student', str(tmp_path/'missing'), check=False)
        assert p.returncode != 0
        n_prompts = sum(len(read_jsonl(tmp_path/'r'/f'prompts_{s}.jsonl')) for s in ('train', 'val'))
        assert len(srv.calls) == n_prompts > 0
        # 2. resumed: every label is reused, the teacher is not called again
        distill(tmp_path, '--run-name', 'r', *SMALL, *teacher)
        assert len(srv.calls) == n_prompts
        assert (tmp_path/'r'/'metrics.json').exists()
        ids = [r['id'] for r in read_jsonl(tmp_path/'r'/'labeled_data.jsonl')]
        assert len(ids) == len(set(ids))
        # 3. --overwrite asks the teacher again for every prompt
        distill(tmp_path, '--run-name', 'r', *SMALL, *teacher, '--overwrite')
        assert len(srv.calls) == 2*n_prompts


def test_label_command_with_an_api_teacher_cleans_only_its_labels(tmp_path):
    "`stockdistill label` works with an API teacher and cleans that teacher's labels only, not others in the file."
    distill(tmp_path, 'label', '--run-name', 'lab', *SMALL)                     # the rule teacher labels first
    with ChatServer() as srv:
        distill(tmp_path, 'label', '--run-name', 'lab', *SMALL, '--teacher', srv.base_url, '--teacher-model', 'test-model')
    run = tmp_path/'lab'
    n = len(read_jsonl(run/'prompts_train.jsonl'))
    assert len(srv.calls) == n + len(read_jsonl(run/'prompts_val.jsonl')) > 0
    assert len({r['teacher'] for r in read_jsonl(run/'labeled_data.jsonl')}) == 2     # both teachers' labels are kept
    cleaned = read_jsonl(run/'cleaned_labeled_data.jsonl')
    assert len(cleaned) == n and len({r['id'] for r in cleaned}) == n


@pytest.mark.parametrize('cmd', ['train', 'report'])
def test_single_step_commands_need_an_existing_run(tmp_path, cmd):
    p = distill(tmp_path, cmd, '--run-name', 'empty', check=False)
    assert p.returncode == 2 and 'stockdistill ' + cmd in p.stderr

"""End-to-end tests of the one-command pipeline: the real CLI in a subprocess, on the bundled data, with the tiny
student; the teacher is the rule teacher, or the real OpenAI client against the chat-completions server of
`chat_server.py`. Each bad input a new user tried must end in one line naming what to fix, with nothing lost."""
import json
import os
import re
import stat
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
COMMANDS = ('distill', 'train', 'label', 'report', 'evaluate', 'ask', 'compare')


def distill(runs, *args, check=True, env=None):
    "Run `python -m stockdistill.distill` in a fresh process; return the finished process."
    sub = list(args[:1]) if args and args[0] in COMMANDS else []
    cmd = [sys.executable, '-m', 'stockdistill.distill', *sub, '--runs-dir', str(runs), *args[len(sub):]]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', **(env or {})}
    for k in ('ARK_API_KEY', 'DASHSCOPE_API_KEY'): env.pop(k, None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def one_line_error(p, cmd='distill'):
    "The process ended with status 2 and a last stderr line `stockdistill CMD: error: …`, no traceback; return that line."
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert 'Traceback' not in p.stderr, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f'stockdistill {cmd}: error: '), line
    return line


def read_jsonl(p):
    return [json.loads(line) for line in Path(p).read_text(encoding='utf-8').split('\n') if line.strip()]


def test_cli_end_to_end_writes_every_artifact(tmp_path):
    p = distill(tmp_path, '--run-name', 'e2e', *SMALL)
    assert re.search(SEED_LINES, p.stdout), p.stdout
    assert 'stage times: check' in p.stdout
    run = tmp_path/'e2e'
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['codes'] == ['600031', '000002'] and cfg['windows'] == 3 and cfg['teacher'] == 'rule'
    for split in ('train', 'val'):
        prompts = read_jsonl(run/f'prompts_{split}.jsonl')
        assert prompts and all(r['prompt'].startswith('股票 ') and r['outcome']['direction'] in ('up', 'down', 'flat')
                               for r in prompts)
    labels = read_jsonl(run/'teachers'/'rule'/'labeled_data.jsonl')
    assert {r['teacher'] for r in labels} == {'rule'} and all(set(r['label']) >= {'prediction', 'analysis', 'advice'}
                                                              for r in labels)
    cleaned = read_jsonl(run/'teachers'/'rule'/'cleaned_labeled_data.jsonl')
    assert len(cleaned) == len(labels) and all(isinstance(json.loads(r['label']), dict) for r in cleaned)
    assert read_jsonl(run/'teachers'/'rule'/'cleaned_val_labeled_data.jsonl')
    summary = json.loads((run/'teachers'/'rule'/'label_summary.json').read_text())
    assert summary['splits']['train']['answers'] == len(labels) and summary['splits']['train']['cleaned']['kept'] == len(cleaned)
    adapter = run/'lora_adapter'
    acfg = json.loads((adapter/'adapter_config.json').read_text())
    assert acfg['peft_type'] == 'LORA'
    assert (adapter/'progress.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = json.loads((adapter/'train_summary.json').read_text())
    assert summary['steps'] == 3 and summary['train_examples'] == len(cleaned)
    assert summary['prompt'] == {'window': 30, 'indicators': False, 'max_tokens': None, 'context': '',
                                 'counted': summary['prompt']['counted']}
    metrics = json.loads((run/'metrics.json').read_text())
    for side in ('before', 'after'):
        assert all(0 <= metrics[side][k] <= 1 for k in ('bleu', 'rougeL', 'json_valid'))
        assert -1 <= metrics[side]['embed'] <= 1
    assert metrics['n'] == 2 and metrics['split'] == 'val' and metrics['stage_seconds']['total'] > 0
    html = (run/'report.html').read_text(encoding='utf-8')
    assert 'Before fine-tuning:' in html and 'Plotly.newPlot' in html and '<script src="http' not in html
    assert str(run/'report.html') in p.stdout


def test_a_copied_run_folder_still_loads_its_adapter(tmp_path):
    "An adapter whose base lives in the run records it relative to itself: the run can be moved."
    distill(tmp_path, '--run-name', 'orig', *SMALL)
    acfg = json.loads((tmp_path/'orig'/'lora_adapter'/'adapter_config.json').read_text())
    base = acfg['base_model_name_or_path']
    assert base == 'tiny' or not Path(base).is_absolute(), base
    os.rename(tmp_path/'orig', tmp_path/'moved')
    p = distill(tmp_path, 'ask', '请问股票600031未来走势如何？', '--run-name', 'moved')
    assert '=== student ===' in p.stdout and '股票 600031 近30日K线数据' in p.stdout


def test_config_file_repeats_a_run_and_flags_win(tmp_path):
    distill(tmp_path, 'label', '--run-name', 'a', *SMALL)
    cfg = json.loads((tmp_path/'a'/'config.json').read_text())
    distill(tmp_path, 'label', '--config', str(tmp_path/'a'/'config.json'), '--run-name', 'b', '--windows', '2')
    b = json.loads((tmp_path/'b'/'config.json').read_text())
    assert {k: v for k, v in b.items() if k not in ('run_name', 'windows')} == {k: v for k, v in cfg.items() if k not in ('run_name', 'windows')}
    assert (b['run_name'], b['windows']) == ('b', 2)
    (tmp_path/'bad.yaml').write_text('windows: 2\nwidnows: 3\n')
    line = one_line_error(distill(tmp_path, '--config', str(tmp_path/'bad.yaml'), check=False))
    assert 'widnows' in line


def test_skip_teacher_without_labels_is_a_clear_error(tmp_path):
    line = one_line_error(distill(tmp_path, '--run-name', 'nolabels', '--skip-teacher', *SMALL, check=False))
    assert '--skip-teacher' in line and 'no labels' in line
    assert not (tmp_path/'nolabels'/'teachers').exists()


def test_skip_teacher_trains_on_this_teachers_newest_label_per_prompt_of_this_build(tmp_path):
    "Labels of other builds (stale prompts) and of other teachers never reach training; they are counted."
    both = ['--stock', '600031', '--stock', '000002', '--windows', '5', '--val-ratio', '0.34']
    distill(tmp_path, 'label', '--run-name', 's', *both)
    with ChatServer() as srv:
        distill(tmp_path, 'label', '--run-name', 's', *both, '--teacher', srv.base_url, '--teacher-model', 'm')
    # one stock now: its windows are the same (each stock draws from its own generator), the other's labels are stale
    p = distill(tmp_path, '--run-name', 's', '--stock', '600031', '--windows', '5', '--val-ratio', '0.34', '--max-steps', '2',
                '--eval-limit', '2', '--max-new-tokens', '8', '--skip-teacher')
    run = tmp_path/'s'
    ids = {r['id'] for r in read_jsonl(run/'prompts_train.jsonl')}
    cleaned = read_jsonl(run/'teachers'/'rule'/'cleaned_labeled_data.jsonl')
    assert {r['id'] for r in cleaned} == ids and len(cleaned) == len(ids) and {r['teacher'] for r in cleaned} == {'rule'}
    stale = len(read_jsonl(run/'teachers'/'rule'/'labeled_data.jsonl')) - len(ids)
    assert stale > 0 and f'{stale} stale' in p.stdout
    summary = json.loads((run/'lora_adapter'/'train_summary.json').read_text())
    assert summary['train_examples'] == len(ids)


def test_resume_after_labeling_pays_nothing_and_overwrite_relabels(tmp_path):
    with ChatServer() as srv:
        teacher = ['--teacher', srv.base_url, '--teacher-model', 'test-model']
        # 1. the run dies after labeling: max_len 50 leaves no answer token to train on
        p = distill(tmp_path, '--run-name', 'r', *SMALL, *teacher, '--max-len', '50', check=False)
        assert p.returncode != 0
        n_prompts = sum(len(read_jsonl(tmp_path/'r'/f'prompts_{s}.jsonl')) for s in ('train', 'val'))
        asked = [c for c in srv.calls if c['prompt'].startswith('股票 ')]
        assert len(asked) == n_prompts > 0
        # 2. resumed: every label is reused, the teacher is asked only its check request
        distill(tmp_path, '--run-name', 'r', *SMALL, *teacher)
        assert len([c for c in srv.calls if c['prompt'].startswith('股票 ')]) == n_prompts
        assert (tmp_path/'r'/'metrics.json').exists()
        ids = [r['id'] for r in read_jsonl(tmp_path/'r'/'teachers'/'openai_test-model'/'labeled_data.jsonl')]
        assert len(ids) == len(set(ids))
        # 3. --overwrite asks the teacher again for every prompt; the file keeps one line per prompt
        distill(tmp_path, '--run-name', 'r', *SMALL, *teacher, '--overwrite')
        assert len([c for c in srv.calls if c['prompt'].startswith('股票 ')]) == 2*n_prompts
        assert len(read_jsonl(tmp_path/'r'/'teachers'/'openai_test-model'/'labeled_data.jsonl')) == len(ids)


def test_overwrite_with_a_teacher_that_fails_loses_nothing(tmp_path):
    "A missing key (and a rejected one) is found before any file is touched: labels and config.json stay."
    distill(tmp_path, '--run-name', 'keep', *SMALL)
    run = tmp_path/'keep'
    before = {p: p.read_bytes() for p in run.rglob('*.json*') if 'checkpoint' not in str(p)}
    line = one_line_error(distill(tmp_path, '--run-name', 'keep', *SMALL, '--teacher', 'deepseek-r1', '--overwrite', check=False))
    assert 'ARK_API_KEY' in line
    with ChatServer(default_mode='400') as srv:
        line = one_line_error(distill(tmp_path, '--run-name', 'keep', *SMALL, '--teacher', srv.base_url,
                                      '--teacher-model', 'm', '--overwrite', check=False))
    assert 'did not answer a test request' in line and 'HTTP 400' in line
    assert {p: p.read_bytes() for p in run.rglob('*.json*') if 'checkpoint' not in str(p)} == before
    assert not (run/'teachers'/'deepseek-r1_deepseek-r1-250528').exists()


def test_a_missing_student_is_found_before_labelling(tmp_path):
    with ChatServer() as srv:
        line = one_line_error(distill(tmp_path, '--run-name', 'm', *SMALL, '--teacher', srv.base_url, '--teacher-model', 'm',
                                      '--student', str(tmp_path/'no-such-model'), check=False))
        assert not [c for c in srv.calls if c['prompt'].startswith('股票 ')]       # no label was paid for
    assert '--student' in line and 'no-such-model' in line
    assert not (tmp_path/'m').exists()


def test_no_usable_labels_says_what_was_dropped(tmp_path):
    with ChatServer(default_mode='garbage') as srv:
        line = one_line_error(distill(tmp_path, '--run-name', 'g', *SMALL, '--teacher', srv.base_url, '--teacher-model', 'm',
                                      check=False))
    assert 'no usable labels from teacher openai:m' in line and 'raw_label' in line
    summary = json.loads((tmp_path/'g'/'teachers'/'openai_m'/'label_summary.json').read_text())
    assert summary['splits']['train']['unparseable'] == summary['splits']['train']['prompts'] > 0


def test_retry_unparseable_asks_again_and_timeout_flags_reach_the_client(tmp_path):
    label = lambda *extra: distill(tmp_path, 'label', '--run-name', 'u', *SMALL, '--teacher', srv.base_url,
                                   '--teacher-model', 'm', *extra).stdout
    with ChatServer(default_mode='garbage') as srv:
        assert 'warning: no usable labels' in label()      # `label` labels and warns; `train` would stop
        n = len([c for c in srv.calls if c['prompt'].startswith('股票 ')])
        label()
        assert len([c for c in srv.calls if c['prompt'].startswith('股票 ')]) == n          # unparseable: not asked again …
        label('--retry-unparseable')
        assert len([c for c in srv.calls if c['prompt'].startswith('股票 ')]) == 2*n        # … unless asked to
    with ChatServer(default_mode='hang', hang_s=3) as srv:
        line = one_line_error(distill(tmp_path, 'label', '--run-name', 'h', *SMALL, '--teacher', srv.base_url, '--teacher-model', 'm',
                                      '--timeout', '0.5', '--max-retries', '0', check=False), 'label')
        assert 'timeout after 0.5s' in line and len(srv.calls) == 1


def test_malformed_reply_fails_one_prompt_not_the_run(tmp_path):
    "One HTTP 200 whose body is not JSON is a transient failure of that prompt; the others are labelled."
    from stockdistill.teacher import OpenAITeacher, label_samples
    with ChatServer() as srv:
        t = OpenAITeacher(srv.base_url, model='m', max_retries=1, backoff=0.01)
        out = label_samples(['问题一', '问题二 [mode:badjson]', '问题三'], t, tmp_path/'l.jsonl', progress=False)
    assert [r['error'] is None for r in out] == [True, False, True]
    assert out[1]['error'].startswith('transient: malformed reply')


def test_a_corrupt_label_file_is_read_around_and_named(tmp_path):
    "An invalid UTF-8 byte and a cut-off line in a label file: resume, --skip-teacher and evaluate go on, naming them."
    distill(tmp_path, '--run-name', 'c', *SMALL)
    labels = tmp_path/'c'/'teachers'/'rule'/'labeled_data.jsonl'
    good = labels.read_bytes()
    labels.write_bytes(good + b'{"id": "x", "prompt": "\xff", "teacher": "rule"}\n{"id": "cut", "pro')
    p = distill(tmp_path, '--run-name', 'c', *SMALL, '--skip-teacher')
    assert 'labeled_data.jsonl: skipped 2 unreadable line(s)' in p.stderr and 'not UTF-8' in p.stderr and 'cut off' in p.stderr
    p = distill(tmp_path, '--run-name', 'c', *SMALL)        # resume: the teacher answers nothing new
    assert 'skipped 2 unreadable line(s)' in p.stderr
    p = distill(tmp_path, 'evaluate', '--run-name', 'c', '--no-embed')
    assert 'After fine-tuning:  bleu: ' in p.stdout and json.loads((tmp_path/'c'/'metrics.json').read_text())['n'] == 2


def test_eastmoney_unreachable_is_one_line(tmp_path):
    env = {'STOCKDISTILL_EASTMONEY_URL': 'http://127.0.0.1:9', 'XDG_CACHE_HOME': str(tmp_path/'cache')}
    line = one_line_error(distill(tmp_path, '--run-name', 'em', '--data-source', 'eastmoney', *SMALL, check=False, env=env))
    assert 'source="bundled"' in line or 'EastMoney' in line or 'eastmoney' in line.lower()
    assert not (tmp_path/'em'/'prompts_train.jsonl').exists()


def test_a_csv_folder_defaults_to_all_its_codes_and_counts_dropped_bars(tmp_path):
    from stockdistill.data import load_bars
    src = tmp_path/'bars'; src.mkdir()
    for c in ('600031', '000002'):
        b = load_bars(c); b['date'] = b['date'].dt.strftime('%Y-%m-%d')
        if c == '600031': b.loc[10, 'high'] = b.loc[10, 'low'] - 1
        b.to_csv(src/f'{c}.csv', index=False)
    p = distill(tmp_path, 'label', '--run-name', 'csv', '--data-source', str(src), '--windows', '2')
    stats = json.loads((tmp_path/'csv'/'dataset_stats.json').read_text())
    assert stats['stocks'] == 2 and stats['bars_dropped'] == {'600031': {'high_below_body': 1}}
    assert '1 invalid bar(s) dropped: 600031 high_below_body=1' in p.stdout


def test_written_files_follow_the_umask(tmp_path):
    os.umask(old := os.umask(0o022))
    distill(tmp_path, 'label', '--run-name', 'u', '--stock', '600031', '--windows', '2')
    for f in ('prompts_train.jsonl', 'dataset_stats.json', 'teachers/rule/cleaned_labeled_data.jsonl'):
        assert stat.S_IMODE((tmp_path/'u'/f).stat().st_mode) == 0o666 & ~old, f


def test_label_command_with_an_api_teacher_keeps_the_teachers_apart(tmp_path):
    "`stockdistill label` works with an API teacher; each teacher's labels live and are cleaned in its own folder."
    distill(tmp_path, 'label', '--run-name', 'lab', *SMALL)                     # the rule teacher labels first
    with ChatServer() as srv:
        distill(tmp_path, 'label', '--run-name', 'lab', *SMALL, '--teacher', srv.base_url, '--teacher-model', 'test-model')
    run = tmp_path/'lab'
    n = len(read_jsonl(run/'prompts_train.jsonl'))
    assert len([c for c in srv.calls if c['prompt'].startswith('股票 ')]) == n + len(read_jsonl(run/'prompts_val.jsonl')) > 0
    for t in ('rule', 'openai_test-model'):
        cleaned = read_jsonl(run/'teachers'/t/'cleaned_labeled_data.jsonl')
        assert len(cleaned) == n and len({r['id'] for r in cleaned}) == n
        assert {r['teacher'] for r in read_jsonl(run/'teachers'/t/'labeled_data.jsonl')} == {t.replace('openai_', 'openai:')}


def test_several_teachers_label_the_same_prompts(tmp_path):
    with ChatServer() as srv:
        p = distill(tmp_path, 'label', '--run-name', 'two', *SMALL, '--teacher', f'rule,{srv.base_url}', '--teacher-model', 'm')
    run = tmp_path/'two'
    assert (run/'teachers'/'rule'/'label_summary.json').exists() and (run/'teachers'/'openai_m'/'label_summary.json').exists()
    assert 'teacher rule' in p.stdout or 'rule' in p.stdout


@pytest.mark.parametrize('cmd', ['train', 'report', 'evaluate'])
def test_single_step_commands_need_an_existing_run(tmp_path, cmd):
    one_line_error(distill(tmp_path, cmd, '--run-name', 'empty', check=False), cmd)


def test_compare_two_runs(tmp_path):
    distill(tmp_path, '--run-name', 'a', *SMALL)
    distill(tmp_path, '--run-name', 'b', *SMALL, '--lr', '0.001')
    distill(tmp_path, 'compare', 'a', 'b')
    table = json.loads((tmp_path/'compare'/'compare.json').read_text())
    assert 'lr' in json.dumps(table) and (tmp_path/'compare'/'compare.html').read_text().count('Plotly.newPlot') >= 1
    assert 'nope' in one_line_error(distill(tmp_path, 'compare', 'a', 'nope', check=False), 'compare')


def test_every_command_lists_in_help():
    p = subprocess.run([sys.executable, '-m', 'stockdistill.cli', '--help'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and all(c in p.stdout for c in COMMANDS)

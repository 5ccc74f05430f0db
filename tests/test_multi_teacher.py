"""Multi-teacher runs: the presets against local servers that answer as each provider does, labels of several
teachers killed and resumed, the consensus and ranking rules, the agreement matrix on a hand-built case, a missing
key, and the `multi` command end to end with one teacher failing (then `evaluate --questions --models-dir`)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import THOUGHT_TOKENS, ChatServer, label_for  # noqa: E402
from stockdistill.config import DistillConfig  # noqa: E402
from stockdistill.distill import RunError  # noqa: E402
from stockdistill.multi_teacher import (ConsensusTeacher, agreement_matrix, billable_tokens, consensus_label,  # noqa: E402
                                        label_cost, label_teachers, limit_rate, make_teachers, per_teacher,
                                        pick_best, teacher_price, vote)
from stockdistill.teacher import PRESETS, TeacherUnavailable, get_teacher, read_labels  # noqa: E402

REPO = Path(__file__).parent.parent
KEYS = ('ARK_API_KEY', 'DEEPSEEK_API_KEY', 'DASHSCOPE_API_KEY', 'GEMINI_API_KEY', 'GOOGLE_API_KEY')


@pytest.fixture
def no_keys(monkeypatch):
    for k in KEYS: monkeypatch.delenv(k, raising=False)


def preset_teacher(preset, url, **kw):
    "A preset teacher (its name, model, key variable and price) pointed at the local server, with quick retries."
    t = get_teacher(preset, timeout=5, max_retries=1, **kw)
    t.base_url, t.backoff = url, 0.05
    return t


# ---- the presets, against servers that answer as their providers do ------------------------------------------

@pytest.mark.parametrize('preset,mode,env', [('deepseek-r1', 'ark', 'ARK_API_KEY'), ('gemini', 'gemini', 'GOOGLE_API_KEY'),
                                             ('qwen-max', 'dashscope', 'DASHSCOPE_API_KEY')])
def test_each_preset_reads_its_providers_answers_and_bills_them(preset, mode, env, no_keys, monkeypatch):
    monkeypatch.setenv(env, 'sk-test-1')
    with ChatServer(default_mode=mode) as srv:
        t = preset_teacher(preset, srv.base_url)
        [r] = t.answer(['股票 600031 的提问'])
        assert srv.calls[-1]['model'] == PRESETS[preset]['model'] and srv.calls[-1]['auth'] == 'Bearer sk-test-1'
    assert r['error'] is None and r['label'] == label_for('股票 600031 的提问')
    assert (r['reasoning'] is not None) == (mode == 'ark')          # R1 sends its reasoning apart from the answer
    n_in, n_out = billable_tokens(r['usage'])
    assert n_in == r['usage']['prompt_tokens']
    assert n_out == r['usage']['completion_tokens'] + (THOUGHT_TOKENS if mode == 'gemini' else 0)
    price = teacher_price(preset)
    cost = label_cost([{'usage': r['usage']}], price, cny_per_usd=8.0)
    assert cost['cost'] == pytest.approx((n_in*price['input'] + n_out*price['output'])/1e6)
    assert cost['cost_usd'] == pytest.approx(cost['cost']/(8.0 if price['currency'] == 'CNY' else 1.0))
    assert price['read'] and price['source']


@pytest.mark.parametrize('preset,mode,env,final,text', [
    ('deepseek-r1', 'ark401', 'ARK_API_KEY', True, 'API key format is incorrect'),
    ('gemini', 'gemini400', 'GEMINI_API_KEY', True, 'API key not valid'),       # a bad key is a 400, body a JSON list
    ('qwen-max', 'dashscope401', 'DASHSCOPE_API_KEY', True, 'Incorrect API key provided'),
    ('gemini', 'gemini429', 'GEMINI_API_KEY', False, 'RESOURCE_EXHAUSTED'),
    ('gemini', 'gemini503', 'GEMINI_API_KEY', False, 'overloaded'),
    ('qwen-max', 'dashscope500', 'DASHSCOPE_API_KEY', False, 'internal error')])
def test_provider_error_bodies_end_in_a_reason_and_fail_the_check(preset, mode, env, final, text, no_keys, monkeypatch):
    monkeypatch.setenv(env, 'sk-test-1')
    with ChatServer(default_mode=mode) as srv:
        t = preset_teacher(preset, srv.base_url)
        [r] = t.answer(['股票 600031 的提问'])
        assert len(srv.calls) == (1 if final else 2), 'client errors are not retried, 429 and 5xx are'
        with pytest.raises(TeacherUnavailable, match=f'teacher {t.name} .*{text}'): t.check()
    assert r['label'] is None and r['error'].startswith('final' if final else 'transient') and text in r['error']


# ---- settings of each teacher --------------------------------------------------------------------------------

def test_per_teacher_settings_reach_their_teachers(no_keys):
    cfg = DistillConfig(teacher='rule,http://127.0.0.1:9/v1,gemini,consensus').replace(
        mt_models='http://127.0.0.1:9/v1=m1', mt_concurrency='gemini=3', mt_rpm='gemini=30', mt_prices='http://127.0.0.1:9/v1=1/2/CNY')
    ts = make_teachers(cfg)
    assert [t.name for t in ts.values()] == ['rule', 'openai:m1', 'gemini:gemini-2.5-flash', 'consensus']
    assert ts['gemini'].concurrency == 3 and ts['gemini'].rpm == 30 and ts['http://127.0.0.1:9/v1'].concurrency == 8
    assert ts['http://127.0.0.1:9/v1'].price == dict(input=1.0, output=2.0, currency='CNY', source='--mt-prices')
    assert ts['gemini'].price == PRESETS['gemini']['price'] and ts['rule'].price['input'] == 0
    assert per_teacher('a=1, b = 2', 'mt_rpm', float) == {'a': 1.0, 'b': 2.0}
    for bad, msg in [(dict(mt_rpm='gemini'), "--mt-rpm: 'gemini' is not 'teacher=value'"),
                     (dict(mt_concurrency='gemini=x'), '--mt-concurrency'),
                     (dict(mt_models='deepseek-r1=x'), '--mt-models: deepseek-r1 is not one of this run'),
                     (dict(mt_prices='gemini=1/2/EUR'), "currency 'EUR'")]:
        with pytest.raises(RunError, match=msg): make_teachers(cfg.replace(**bad))
    with pytest.raises(RunError, match='at least two teachers'): make_teachers(DistillConfig(teacher='rule'))
    with pytest.raises(RunError, match='file their labels as rule'): make_teachers(DistillConfig(teacher='rule,rule:balanced'))
    with pytest.raises(RunError, match='consensus needs at least two other'): make_teachers(DistillConfig(teacher='rule,consensus'))
    with pytest.raises(RunError, match="--teacher gpt-x: unknown teacher"): make_teachers(DistillConfig(teacher='rule,gpt-x'))


def test_rate_limit_spaces_requests_across_workers():
    with ChatServer() as srv:
        t = limit_rate(get_teacher(srv.base_url, model='m', concurrency=4), rpm=300)   # one request per 0.2 s
        t.answer([f'q{i}' for i in range(5)])
        ts = sorted(c['t'] for c in srv.calls)
    assert min(b - a for a, b in zip(ts, ts[1:])) >= 0.15, ts


# ---- the consensus -------------------------------------------------------------------------------------------

def test_consensus_is_the_plurality_and_a_tie_is_flat():
    assert vote({'a': 'up', 'b': 'up', 'c': 'down'}) == ('up', {'up': 2, 'down': 1})
    assert vote({'a': 'up', 'b': 'down'})[0] == 'flat'                        # a tie for most votes
    assert vote({'a': 'up', 'b': 'down', 'c': 'flat'})[0] == 'flat'
    assert vote({'a': 'up', 'b': 'down', 'c': 'down', 'd': 'flat'})[0] == 'down'   # a plurality, not a majority
    assert vote({'a': 'up', 'b': 'unknown', 'c': None})[0] == 'up'            # unreadable answers abstain
    assert vote({'a': 'unknown'}) == (None, {})
    up = {'prediction': '后市看涨', 'analysis': '放量上攻', 'advice': '持有'}
    down = {'prediction': '可能继续下跌', 'analysis': '跌破均线', 'advice': '减仓'}
    flat = {'prediction': '预计横盘整理', 'analysis': '缩量', 'advice': '观望'}
    label, why = consensus_label({'a': down, 'b': up, 'c': up})
    assert label == up and '采用b的回答' in why                              # the first label that says the winner
    label, why = consensus_label({'a': up, 'b': down, 'c': flat, 'd': flat})
    assert label == flat and '结果震荡' in why
    label, why = consensus_label({'a': up, 'b': down})                        # nobody said flat: a written flat answer
    assert label['prediction'] == '多空分歧，短期以震荡为主' and label['analysis'] == up['analysis'] and '票数相同' in why
    assert consensus_label({'a': None, 'b': {'raw': '?'}})[0] is None
    with pytest.raises(TeacherUnavailable, match='at least two'): ConsensusTeacher({'a': []}).check()


# ---- the agreement matrix on a hand-built case ----------------------------------------------------------------

def test_agreement_matrix_on_a_hand_built_case():
    up = lambda s: {'prediction': '后市看涨', 'analysis': s, 'advice': '持有'}
    down = lambda s: {'prediction': '可能继续下跌', 'analysis': s, 'advice': '减仓'}
    labels = {'A': {1: up('x'), 2: up('y'), 3: down('z'), 4: down('w')},
              'B': {1: up('x'), 2: down('y'), 3: down('z')},              # B never answered window 4
              'C': {1: down('q'), 2: down('q'), 3: up('q'), 4: up('q')}}
    m = agreement_matrix(labels)
    assert m['n'] == {'A': {'A': 4, 'B': 3, 'C': 4}, 'B': {'A': 3, 'B': 3, 'C': 3}, 'C': {'A': 4, 'B': 3, 'C': 4}}
    d = m['direction_agreement']
    assert (d['A']['B'], d['B']['A'], d['A']['C'], d['B']['C'], d['C']['C']) == (2/3, 2/3, 0.0, 1/3, 1.0)
    from stockdistill.evaluate import rouge_l
    from stockdistill.prompt import label_text
    assert m['rougeL']['A']['B'] == pytest.approx((2 + rouge_l(label_text(up('y')), label_text(down('y'))))/3)
    assert m['rougeL']['A']['B'] == m['rougeL']['B']['A'] and m['bleu']['A']['A'] == 1.0 and 'embed' not in m


# ---- the ranking rule ----------------------------------------------------------------------------------------

def test_the_rank_rule_explains_its_pick():
    row = lambda mcc, agree, cost, status='ok': dict(status=status, student_mcc=mcc, agreement=agree, cost_usd=cost)
    rows = {'a': row(0.10, 0.50, 1.0), 'b': row(0.13, 0.60, 5.0), 'c': row(0.12, 0.60, 2.0), 'd': row(0.90, 0.9, 0, 'failed')}
    winner, why = pick_best(rows, 'mcc:0.02,agreement,cost')
    assert winner == 'c', why           # a is out on MCC; b and c tie on agreement; c is cheaper; failed d never counts
    assert 'out: a 0.1' in why[0] and 'best 0.6' in why[1] and 'out: b 5' in why[2]
    assert pick_best(rows, 'mcc')[0] == 'b'
    assert pick_best({'x': row(None, 1, 1), 'y': row(0.1, 0, 1)}, 'mcc:0.5')[0] == 'y'   # unknown is never within
    assert pick_best({'x': row(0.1, 1, None), 'y': row(0.1, 1, None)}, 'cost')[1][-1].startswith('still tied')
    with pytest.raises(ValueError, match="--mt-rank: unknown criterion 'speed'"): pick_best(rows, 'mcc,speed')
    with pytest.raises(ValueError, match='--mt-rank'): pick_best(rows, 'mcc:x')


# ---- labels of several teachers, killed midway and resumed ---------------------------------------------------

KILLABLE = """
import sys
from stockdistill.config import DistillConfig
from stockdistill.dataset import build_dataset
from stockdistill.multi_teacher import label_teachers, make_teachers
runs, u1, u2 = sys.argv[1:4]
cfg = DistillConfig(runs_dir=runs, run_name='k', codes=['600031', '000002'], windows=8, val_ratio=0.25, max_tokens=900,
                    teacher=f'rule,{u1},{u2},consensus', concurrency=2).replace(mt_models=f'{u1}=m1,{u2}=m2')
label_teachers(cfg, build_dataset(cfg, write=True), make_teachers(cfg))
"""


def test_killed_labelling_of_several_teachers_resumes_without_duplicates_or_paying_twice(tmp_path):
    run = tmp_path/'k'
    with ChatServer(delay=0.15) as s1, ChatServer(delay=0.15) as s2:
        proc = subprocess.Popen([sys.executable, '-c', KILLABLE, str(tmp_path), s1.base_url, s2.base_url], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        f1 = run/'teachers'/'openai_m1'/'labeled_data.jsonl'
        deadline = time.time() + 120
        while not (f1.exists() and f1.read_text(encoding='utf-8').count('\n') >= 4):
            assert proc.poll() is None and time.time() < deadline, 'labelling must still be running'
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL); proc.wait(); time.sleep(0.3)
        before = {n: {r['id'] for s in ('', 'val_') for r in read_labels(run/'teachers'/n/f'{s}labeled_data.jsonl', warn=False)}
                  for n in ('openai_m1', 'openai_m2')}
        n1, n2 = len(s1.calls), len(s2.calls)
        from stockdistill.dataset import build_dataset
        cfg = DistillConfig(runs_dir=str(tmp_path), run_name='k', codes=['600031', '000002'], windows=8, val_ratio=0.25,
                            max_tokens=900, teacher=f'rule,{s1.base_url},{s2.base_url},consensus',
                            concurrency=2).replace(mt_models=f'{s1.base_url}=m1,{s2.base_url}=m2')
        ds = build_dataset(cfg, write=True)
        res = label_teachers(cfg, ds, make_teachers(cfg))
        asked = {'openai_m1': [c['prompt'] for c in s1.calls[n1:]], 'openai_m2': [c['prompt'] for c in s2.calls[n2:]]}
    ids = sorted(r['id'] for s in ('train', 'val') for r in ds[s])
    assert 0 < len(before['openai_m1']) < len(ids), 'the kill must land midway'
    for n in ('rule', 'openai_m1', 'openai_m2', 'consensus'):
        lines = [r for s in ('', 'val_') for r in read_labels(run/'teachers'/n/f'{s}labeled_data.jsonl')]
        assert sorted(r['id'] for r in lines) == ids, f'{n}: every id exactly once'
        assert res[n.replace('openai_', 'openai:')]['status'] == 'ok'
    for n, prompts in asked.items():
        done = {r['prompt'] for s in ('train', 'val') for r in ds[s] if r['id'] in before[n]}
        assert not done & set(prompts), f'{n}: asked again for a label it had'
        assert len([p for p in prompts if p.startswith('股票')]) == len(ids) - len(before[n])


def test_a_missing_key_fails_that_teacher_only_and_names_it_and_its_variable(tmp_path, no_keys, capsys):
    from stockdistill.dataset import build_dataset
    cfg = DistillConfig(runs_dir=str(tmp_path), run_name='m', codes=['600031'], windows=3, val_ratio=0.34, max_tokens=900,
                        teacher='rule,gemini,qwen-max')
    res = label_teachers(cfg, build_dataset(cfg, write=True), make_teachers(cfg))
    out = capsys.readouterr().out
    assert res['rule']['status'] == 'ok' and res['rule']['counts']['train']['answers'] == 2
    for name, var in (('gemini:gemini-2.5-flash', 'GEMINI_API_KEY or GOOGLE_API_KEY'), ('qwen-max:qwen-max', 'DASHSCOPE_API_KEY')):
        assert res[name]['status'] == 'failed' and var in res[name]['error']
        assert any(line.strip().startswith(f'{name}: FAILED') and var in line for line in out.splitlines()), out
        log = json.loads((tmp_path/'m'/'teachers'/name.replace(':', '_')/'labelling.json').read_text())
        assert var in log[-1]['error']


# ---- the command, end to end ---------------------------------------------------------------------------------

SMALL = ['--stock', '600031', '--stock', '000002', '--windows', '3', '--val-ratio', '0.34', '--max-steps', '2',
         '--eval-limit', '2', '--max-new-tokens', '8', '--max-tokens', '900']


def cli(runs, *args, env=None):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', **(env or {})}   # one thread: 2 shared cores
    for k in KEYS: env.pop(k, None)
    return subprocess.run([sys.executable, '-m', 'stockdistill.cli', *args, '--runs-dir', str(runs)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO)


def test_multi_command_with_a_failing_teacher_then_questions(tmp_path):
    with ChatServer() as good, ChatServer(default_mode='ark401') as bad:
        teachers = f'rule,{good.base_url},{bad.base_url},consensus'
        p = cli(tmp_path, 'multi', '--run-name', 'mt', *SMALL, '--teacher', teachers,
                '--mt-models', f'{good.base_url}=good,{bad.base_url}=bad', '--max-retries', '0')
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'openai:bad: FAILED (TeacherUnavailable' in p.stdout and 'best teacher:' in p.stdout
    md = tmp_path/'mt'/'multi_lora'
    data = json.loads((md/'multi_teacher.json').read_text())
    assert [n for n, r in data['teachers'].items() if r['status'] == 'ok'] == ['rule', 'openai:good', 'consensus']
    assert data['teachers']['openai:bad']['status'] == 'failed' and 'HTTP 401' in data['teachers']['openai:bad']['reason']
    assert data['winner'] in ('rule', 'openai:good', 'consensus') and data['why']
    assert set(json.loads((md/'compare.json').read_text())['runs']) == {'rule', 'openai_good', 'consensus'}
    page = (md/'compare.html').read_text()
    assert page.index('Multi-teacher run') < page.index('runs compared') and 'openai:bad' in page
    for t in ('rule', 'openai_good', 'consensus'):
        m = json.loads((md/t/'metrics.json').read_text())
        assert set(m['vs_teachers']) == {'rule', 'openai:good', 'consensus'} and m['split'] == 'val'
        assert (md/t/'lora_adapter'/'adapter_config.json').exists() and (md/t/'report.html').exists()
    assert not (md/'openai_bad').exists()

    qfile = tmp_path/'question.jsonl'
    qfile.write_text('{"question": "请问股票600031和000002未来走势如何？"}\n"600031怎么看？"\n', encoding='utf-8')
    p = cli(tmp_path, 'evaluate', '--run-name', 'mt', '--questions', str(qfile), '--models-dir', 'multi_lora',
            '--max-new-tokens', '8')
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((md/'questions_eval.json').read_text())
    assert set(res['summary']) == {'rule', 'openai_good', 'consensus'} and len(res['answers']) == 3*3
    assert {a['code'] for a in res['answers']} == {'600031', '000002'}
    assert all('agrees_teacher' in a for a in res['answers'] if a['model'] == 'rule')
    p = cli(tmp_path, 'evaluate', '--run-name', 'mt', '--questions', str(qfile))
    assert p.returncode == 2 and 'error: --questions and --models-dir go together' in p.stderr

"""Teachers against a real chat-completions server on 127.0.0.1, driven through the real `openai` client;
resumable labeling under SIGKILL; the rule teacher's contract."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer, label_for  # noqa: E402
from stockdistill.teacher import (DIRECTION_WORDS, ANSWER_KEYS, OpenAITeacher, RuleTeacher, Teacher,  # noqa: E402
                                  extract_json, get_teacher, label_samples, prompt_id, read_labels)

from stockdistill.evaluate import direction_of  # noqa: E402
REPO = Path(__file__).parent.parent


@pytest.fixture(scope='module')
def server():
    with ChatServer(retry_after=1, hang_s=2.0) as srv: yield srv


def fast_teacher(url, **kw):
    "An API teacher with short timeouts and backoffs, so failure paths take seconds."
    return OpenAITeacher(url, model='r1-test', **{**dict(timeout=0.5, max_retries=2, backoff=0.05, max_backoff=2), **kw})


# ---- JSON extraction -------------------------------------------------------------------------------------------

@given(st.dictionaries(st.sampled_from(ANSWER_KEYS), st.text(min_size=1, max_size=30), min_size=1),
       st.text(alphabet=st.characters(blacklist_characters='{}`'), max_size=40),
       st.text(alphabet=st.characters(blacklist_characters='{}`'), max_size=40))
@settings(max_examples=150, deadline=None)
def test_extract_json_finds_the_object_in_any_prose(label, before, after):
    text = json.dumps(label, ensure_ascii=False)
    assert extract_json(before + text + after) == label
    assert extract_json(f'<think>{before}</think>{text}') == label
    assert extract_json(f'{before}\n```json\n{text}\n```\n{after}') == label


def test_extract_json_prefers_the_answer_over_other_objects():
    ans = {'prediction': '上涨', 'analysis': 'a', 'advice': 'b'}
    assert extract_json('参考 {"ma5": 1.2} 之后：' + json.dumps(ans)) == ans
    assert extract_json('no object here') is None
    assert extract_json('[1, 2, 3]') is None


# ---- the API teacher against the scripted server --------------------------------------------------------------

MODES = ['reasoning', 'think', 'fenced', 'prose', 'garbage', '429', '500', '400', 'hang', 'json']


def test_every_server_behaviour_ends_in_the_right_record(server, tmp_path):
    prompts = [f'股票 00000{i} 的提问 [mode:{m}]' for i, m in enumerate(MODES)]
    teacher = fast_teacher(server.base_url, concurrency=4)
    path = tmp_path/'labeled_data.jsonl'
    recs = {r['prompt']: r for r in label_samples(prompts, teacher, path, progress=False)}
    by = {m: recs[p] for m, p in zip(MODES, prompts)}
    for m in ('reasoning', 'think', 'fenced', 'prose', '429', 'json'):
        assert by[m]['label'] == label_for(by[m]['prompt']), m
        assert by[m]['error'] is None and by[m]['usage']['total_tokens'] > 0, m
    assert by['reasoning']['reasoning'] == '近30日先跌后涨，MACD金叉，判断震荡上行。'
    assert by['think']['reasoning'] == '先看均线，再看成交量。'
    assert by['json']['reasoning'] is None
    assert by['garbage']['label'] == {'raw': '抱歉，我无法给出结构化的回答。'} and by['garbage']['error'] is None
    assert by['500']['error'].startswith('transient: HTTP 500') and by['500']['label'] is None
    assert by['hang']['error'].startswith('transient: timeout')
    assert by['400']['error'].startswith('final: HTTP 400')
    # how many requests each prompt cost: one, retries up to max_retries for 5xx/timeouts, none for a 400
    calls = {m: server.calls_for(p) for m, p in zip(MODES, prompts)}
    assert calls == {**{m: 1 for m in MODES}, '429': 2, '500': 3, 'hang': 3}
    t429 = [c['t'] for c in server.calls if c['prompt'] == prompts[MODES.index('429')]]
    assert t429[1] - t429[0] >= 0.95, 'the retry must wait for the Retry-After of 1 s'
    assert teacher.usage_total['total_tokens'] == sum((r['usage'] or {}).get('total_tokens', 0) for r in recs.values())
    assert teacher.requests == sum(calls.values())

    # a re-run retries only the transient failures, never a success or a final error, and leaves one line per id
    before = len(server.calls)
    again = label_samples(prompts, fast_teacher(server.base_url, concurrency=4), path, progress=False)
    asked = [c['prompt'] for c in server.calls[before:]]
    assert sorted(set(asked)) == sorted(prompts[MODES.index(m)] for m in ('500', 'hang'))
    lines = read_labels(path)
    assert sorted(r['id'] for r in lines) == sorted(prompt_id(p) for p in prompts)
    assert [r['id'] for r in again] == [prompt_id(p) for p in prompts]


def test_concurrency_is_bounded_and_used(tmp_path):
    teacher = fast_teacher('http://127.0.0.1:9/v1', timeout=5, concurrency=8)
    with ChatServer(delay=0.2) as srv:
        teacher.base_url = srv.base_url
        out = label_samples([f'q{i}' for i in range(16)], teacher, tmp_path/'l.jsonl', concurrency=4, progress=False)
        assert srv.max_inflight == 4, 'concurrency=4 means four requests in flight, never more'
    assert len(out) == 16 and all(r['error'] is None for r in out)
    assert teacher.concurrency == 8, 'the override holds for this run only'


def test_key_is_read_from_the_environment_at_call_time_and_never_kept(server, monkeypatch):
    monkeypatch.delenv('ARK_API_KEY', raising=False)
    t = OpenAITeacher('deepseek-r1', timeout=5)
    with pytest.raises(Exception, match='ARK_API_KEY'): t.answer(['hi'])
    t.base_url = server.base_url                       # same preset, pointed at the local server
    monkeypatch.setenv('ARK_API_KEY', 'sk-test-98765')
    n = len(server.calls)
    assert t.answer(['key check'])[0]['error'] is None
    assert server.calls[n]['auth'] == 'Bearer sk-test-98765' and server.calls[n]['model'] == 'deepseek-r1-250528'
    assert 'sk-test' not in repr(t) and 'sk-test' not in json.dumps({k: str(v) for k, v in vars(t).items()})


def test_answer_works_inside_a_running_event_loop(server):
    async def in_loop(): return fast_teacher(server.base_url).answer(['from a loop [mode:fenced]'])
    [r] = asyncio.run(in_loop())
    assert r['label'] == label_for('from a loop [mode:fenced]')


def test_get_teacher_specs():
    assert isinstance(get_teacher('rule'), RuleTeacher)
    for preset in ('deepseek-r1', 'deepseek', 'qwen-max', 'gemini'): assert get_teacher(preset).name.startswith(preset + ':')
    assert get_teacher('http://127.0.0.1:9/v1', model='m', concurrency=2).concurrency == 2
    with pytest.raises(ValueError, match='model'): get_teacher('http://127.0.0.1:9/v1')
    with pytest.raises(ValueError, match="unknown teacher 'gpt-x'"): get_teacher('gpt-x')
    assert isinstance(get_teacher('rule', model=None, concurrency=8, timeout=30), RuleTeacher)
    with pytest.raises(TypeError, match='batch_size'): get_teacher('rule', batch_size=4)


# ---- kill a labeling run midway, run it again ------------------------------------------------------------------

KILLABLE = """
import sys
from stockdistill.teacher import OpenAITeacher, label_samples
url, path = sys.argv[1], sys.argv[2]
recs = [{'id': f'id{i:03d}', 'prompt': f'prompt number {i}'} for i in range(40)]
label_samples(recs, OpenAITeacher(url, model='r1-test', concurrency=3, timeout=10), path, progress=False)
"""


def test_killed_run_resumes_without_paying_twice(tmp_path):
    path = tmp_path/'labeled_data.jsonl'
    with ChatServer(delay=0.1) as srv:
        proc = subprocess.Popen([sys.executable, '-c', KILLABLE, srv.base_url, str(path)], cwd=REPO)
        deadline = time.time() + 60
        while time.time() < deadline:
            if path.exists() and path.read_text(encoding='utf-8').count('\n') >= 12: break
            if proc.poll() is not None: pytest.fail(f'labeling exited early with {proc.returncode}')
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL); proc.wait()
        time.sleep(0.3)                                # let requests sent just before the kill reach the log
        done_before = {r['id']: r for r in read_labels(path)}
        assert 12 <= len(done_before) < 40, 'the kill must land midway'
        calls_before = len(srv.calls)

        recs = [{'id': f'id{i:03d}', 'prompt': f'prompt number {i}'} for i in range(40)]
        out = label_samples(recs, OpenAITeacher(srv.base_url, model='r1-test', concurrency=3, timeout=10), path,
                            progress=False)
        asked_after = [c['prompt'] for c in srv.calls[calls_before:]]
    ids = [r['id'] for r in read_labels(path)]
    assert sorted(ids) == [r['id'] for r in recs], 'every id exactly once'
    assert [r['id'] for r in out] == [r['id'] for r in recs]
    assert not {done_before[i]['prompt'] for i in done_before} & set(asked_after), 'no call for an id already done'
    assert len(asked_after) == 40 - len(done_before)
    assert all(r['error'] is None for r in out)


# ---- the rule teacher ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def dataset():
    from stockdistill.dataset import build_dataset
    ds = build_dataset(codes=['600031', '000333', '300014', '601888'], windows=6, window=30, val_ratio=0.25, seed=1)
    return ds['train'] + ds['val']


def _families(text):
    return {d for d, words in DIRECTION_WORDS.items() if any(w in text for w in words)}


def test_rule_teacher_contract(dataset):
    rule = RuleTeacher()
    prompts = [r['prompt'] for r in dataset]
    res = rule.answer(prompts)
    assert rule.answer(prompts) == res, 'deterministic'
    labels = [json.dumps(r['label'], ensure_ascii=False) for r in res]
    assert len(set(labels)) == len(labels), 'different windows, different answers'
    for p, r in zip(prompts, res):
        assert r['error'] is None and r['reasoning']
        assert json.loads(json.dumps(r['label'], ensure_ascii=False)) == r['label']
        assert set(r['label']) == set(ANSWER_KEYS) and all(isinstance(v, str) and v.strip() for v in r['label'].values())
        assert _families(r['label']['prediction']) == {rule.direction(p)}, r['label']['prediction']
        assert direction_of(r['label']['prediction']) == rule.direction(p), 'the evaluation must read the same direction'
        assert len(r['label']['prediction']) <= 20 and len(r['label']['analysis']) <= 140 and len(r['label']['advice']) <= 40
    dirs = {rule.direction(p) for p in prompts}
    assert dirs == {'up', 'down', 'flat'}, f'a varied dataset should get all three directions, got {dirs}'


def test_rule_teacher_reads_the_window_not_the_outcome(dataset):
    from stockdistill.prompt import parse_prompt, make_prompt
    rule = RuleTeacher()
    r = dataset[0]
    code, bars, change = parse_prompt(r['prompt'])
    # the printed % change weighs most: a big rise printed in the prompt turns the prediction up, a big fall down
    up, down = make_prompt(code, bars, change_pct=15.0), make_prompt(code, bars, change_pct=-15.0)
    assert rule.direction(up) == 'up' and rule.direction(down) == 'down'
    # the answer quotes the window's numbers
    label = rule(r['prompt'])['label']
    assert f'{abs(change):.2f}%' in label['analysis']
    # records differ only in the outcome -> same answer (the teacher gets the prompt alone)
    assert rule(r['prompt']) == rule(dict(r, outcome=None)['prompt'])


def test_rule_teacher_rejects_a_prompt_without_a_window():
    r = RuleTeacher()('请问 600519 后市如何？')
    assert r['label'] is None and r['error'].startswith('final: cannot read the window')


@given(st.lists(st.floats(-0.09, 0.09), min_size=2, max_size=40), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_rule_teacher_answers_any_window(returns, seed):
    import numpy as np
    import pandas as pd
    from stockdistill.prompt import make_prompt
    rng = np.random.default_rng(seed)
    close = 10*np.cumprod(1 + np.array(returns))
    bars = pd.DataFrame({'date': pd.bdate_range('2024-01-02', periods=len(close)), 'open': close*(1 + rng.normal(0, .005, len(close))),
                         'close': close, 'high': close*1.01, 'low': close*0.99,
                         'volume': rng.integers(1_000, 100_000, len(close)).astype('int64')})
    prompt = make_prompt('600000', bars)
    r = RuleTeacher()(prompt)
    assert r['error'] is None
    assert _families(r['label']['prediction']) == {RuleTeacher().direction(prompt)}
    assert direction_of(r['label']['prediction']) == RuleTeacher().direction(prompt)


# ---- a local transformers teacher ------------------------------------------------------------------------------

def test_hf_teacher_batches_with_left_padding_like_one_by_one(tmp_path):
    from stockdistill.train import build_tiny_student
    from stockdistill.teacher import HFTeacher
    texts = ['股票 600519 近30日K线数据', '请预测后市走势', '{"prediction": "上涨", "analysis": "放量", "advice": "持有"}']*20
    model, tok = build_tiny_student(texts, tmp_path/'tiny')
    prompts = ['股票 600519 近30日', '请预测后市走势，给出简短分析和操作建议', '上涨', '持有']
    batched = HFTeacher(model, tok, batch_size=4, max_new_tokens=8, name='hf:tiny').answer(prompts)
    single = HFTeacher(model, tok, batch_size=1, max_new_tokens=8, name='hf:tiny').answer(prompts)
    assert batched == single
    assert all(r['label'] is not None and 0 < r['usage']['completion_tokens'] <= 8 for r in batched)
    out = label_samples(prompts, HFTeacher(model, tok, batch_size=2, max_new_tokens=8), tmp_path/'l.jsonl', progress=False)
    assert [r['label'] for r in out] == [r['label'] for r in batched]
    from_disk = get_teacher(f'hf:{tmp_path/"tiny"}', model=None, concurrency=8, batch_size=4, max_new_tokens=8)
    assert from_disk.name == f'hf:{tmp_path/"tiny"}' and from_disk.answer(prompts) == batched


def test_hf_teacher_stops_at_the_generation_configs_eos(tmp_path):
    "A chat model ends its turn with an EOS id of its generation config, not always the tokenizer's: the answer stops there."
    import torch
    from stockdistill.train import build_tiny_student
    from stockdistill.teacher import HFTeacher
    texts = ['股票 600519 近30日K线数据', '请预测后市走势', '{"prediction": "上涨", "analysis": "放量", "advice": "持有"}']*20
    model, tok = build_tiny_student(texts, tmp_path/'tiny')
    prompts = ['股票 600519 近30日', '请预测后市走势，给出简短分析和操作建议']
    with torch.no_grad():
        first = model.generate(**tok(prompts[0], return_tensors='pt'), max_new_tokens=1, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, -1].item()
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    res = HFTeacher(model, tok, batch_size=2, max_new_tokens=8, prompt_format='raw').answer(prompts)
    assert res[0]['usage']['completion_tokens'] == 0
    assert 0 < res[1]['usage']['completion_tokens'] <= 8


def test_a_teacher_is_anything_with_a_name_and_stream(tmp_path):
    class Echo(Teacher):
        name = 'echo'
        def stream(self, prompts):
            for i in reversed(range(len(prompts))): yield i, {'label': {'raw': prompts[i]}, 'reasoning': None, 'usage': None, 'error': None}
    out = label_samples([{'prompt': 'a', 'code': '600000', 'outcome': {'direction': 'up'}}, 'b'], Echo(), tmp_path/'e.jsonl', progress=False)
    assert [r['label']['raw'] for r in out] == ['a', 'b']
    assert out[0]['code'] == '600000' and out[0]['outcome'] == {'direction': 'up'} and 'code' not in out[1]


def test_shards_split_the_records_between_files(tmp_path):
    recs = [{'id': f's{i}', 'prompt': f'p{i}'} for i in range(7)]
    class Upper(Teacher):
        name = 'upper'
        def stream(self, prompts):
            for i, p in enumerate(prompts): yield i, {'label': {'raw': p.upper()}, 'reasoning': None, 'usage': None, 'error': None}
    parts = [label_samples(recs, Upper(), tmp_path/f'part{r}.jsonl', shard=(r, 3), progress=False) for r in range(3)]
    ids = [[x['id'] for x in part] for part in parts]
    assert ids == [['s0', 's3', 's6'], ['s1', 's4'], ['s2', 's5']]
    assert [x['id'] for x in read_labels(tmp_path/'part1.jsonl')] == ['s1', 's4']
    with pytest.raises(ValueError, match='rank'): label_samples(recs, Upper(), tmp_path/'x.jsonl', shard=(3, 3))


def test_unicode_line_separators_in_answers_survive_a_rerun(tmp_path):
    class Odd(Teacher):
        name = 'odd'
        calls = 0
        def stream(self, prompts):
            for i, p in enumerate(prompts):
                self.calls += 1
                yield i, {'label': {'prediction': '震荡\u2028横盘', 'analysis': 'a\x85b\u2029c', 'advice': '观望'},
                          'reasoning': None, 'usage': None, 'error': None}
    t, path = Odd(), tmp_path/'l.jsonl'
    first = label_samples(['p1', 'p2'], t, path, progress=False)
    again = label_samples(['p1', 'p2'], t, path, progress=False)
    assert t.calls == 2 and again == first and first[0]['label']['analysis'] == 'a\x85b\u2029c'

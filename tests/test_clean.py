"""clean_jsonl: exact counts per reason, the output format, atomic writes, and labels straight from label_samples."""
import json

import pytest
from hypothesis import given, settings, strategies as st

import stockdistill.clean as clean
from stockdistill.clean import REASONS, clean_jsonl, clean_record
from stockdistill.teacher import Teacher, label_samples

GOOD = {'id': 'g1', 'prompt': '\n 股票 600031 近30日K线数据: [ ... ]  ', 'label': {'prediction': '震荡上行', 'analysis': '量能放大',
        'advice': ''}, 'reasoning': '先看均线', 'teacher': 'rule', 'usage': None, 'error': None,
        'outcome': {'forward_return': 1.5, 'direction': 'up', 'horizon': 5}}
BAD = {  # line -> the reason it must be dropped for
    '': 'empty_line',
    '   \t': 'empty_line',
    '{"prompt": "p", "label": {"prediction": "上': 'invalid_json',
    'not json at all': 'invalid_json',
    '[{"prompt": "p", "label": "x"}]': 'not_object',
    '"just a string"': 'not_object',
    '{"label": {"prediction": "上涨"}}': 'missing_prompt',
    '{"prompt": "   ", "label": {"prediction": "上涨"}}': 'missing_prompt',
    '{"prompt": 42, "label": {"prediction": "上涨"}}': 'missing_prompt',
    '{"prompt": "p", "label": null, "error": "final: HTTP 400: bad request"}': 'teacher_error',
    '{"prompt": "p", "label": null, "error": "transient: timeout after 60s"}': 'teacher_error',
    '{"prompt": "p"}': 'missing_label',
    '{"prompt": "p", "label": ""}': 'missing_label',
    '{"prompt": "p", "label": "  "}': 'missing_label',
    '{"prompt": "p", "label": {}}': 'missing_label',
    '{"prompt": "p", "label": 3}': 'missing_label',
    '{"prompt": "p", "label": {"raw": "抱歉，我无法回答。"}}': 'raw_label',
    '{"prompt": "p", "label": {"prediction": "", "analysis": " ", "advice": null}}': 'empty_label_fields',
    '{"prompt": "p", "label": {"note": "no answer keys"}}': 'empty_label_fields',
    '{"prompt": "p", "label": {"prediction": 1, "analysis": ["x"]}}': 'empty_label_fields',
}


def test_each_kind_of_bad_line_is_counted_under_its_reason(tmp_path, capsys):
    good2 = {'prompt': 'p2', 'label': '一段文字答案'}
    lines = list(BAD) + [json.dumps(GOOD, ensure_ascii=False), json.dumps(good2, ensure_ascii=False)]
    src = tmp_path/'labeled_data.jsonl'
    src.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    counts = clean_jsonl(src)
    expected = {r: list(BAD.values()).count(r) for r in REASONS} | {'kept': 2}
    assert counts == expected
    printed = capsys.readouterr().out
    assert 'kept 2' in printed and 'invalid_json=2' in printed
    dst = tmp_path/'cleaned_labeled_data.jsonl'
    text = dst.read_text(encoding='utf-8')
    assert '震荡上行' in text, 'labels are written with ensure_ascii=False'
    out = [json.loads(line) for line in text.split('\n') if line]
    assert len(out) == 2
    assert set(out[0]) == set(GOOD), 'every key of the input record is kept'
    assert out[0]['prompt'] == GOOD['prompt'].strip()
    assert isinstance(out[0]['label'], str) and json.loads(out[0]['label']) == GOOD['label']
    assert {k: out[0][k] for k in ('id', 'reasoning', 'outcome')} == {k: GOOD[k] for k in ('id', 'reasoning', 'outcome')}
    assert out[1] == good2


def test_every_line_is_accounted_for_exactly_once():
    for line, reason in BAD.items(): assert clean_record(line) == (None, reason), line
    rec, why = clean_record(json.dumps(GOOD, ensure_ascii=False))
    assert why is None and rec['prompt'] == GOOD['prompt'].strip()


GOOD_LINES = st.builds(lambda p, f: json.dumps({'prompt': p, 'label': {f: '看涨'}}, ensure_ascii=False),
                       st.text(min_size=1).filter(str.strip), st.sampled_from(['prediction', 'analysis', 'advice']))


@given(st.lists(st.one_of(st.sampled_from(list(BAD)), GOOD_LINES), max_size=30))
@settings(max_examples=50, deadline=None)
def test_counts_add_up_to_the_lines(tmp_path_factory, lines):
    d = tmp_path_factory.mktemp('prop')
    src = d/'l.jsonl'
    src.write_text(''.join(line.replace('\n', ' ') + '\n' for line in lines), encoding='utf-8')
    counts = clean_jsonl(src, d/'c.jsonl', check=False, verbose=False)
    assert sum(counts.values()) == len(lines)
    kept = [line for line in (d/'c.jsonl').read_text(encoding='utf-8').split('\n') if line]  # JSONL splits on \n only
    assert len(kept) == counts['kept']
    for line in kept:
        rec = json.loads(line)
        assert rec['prompt'] == rec['prompt'].strip() and rec['prompt'] and isinstance(rec['label'], str)


def test_a_crash_while_cleaning_leaves_the_old_output_untouched(tmp_path, monkeypatch):
    src, dst = tmp_path/'labeled_data.jsonl', tmp_path/'cleaned_labeled_data.jsonl'
    src.write_text('\n'.join(json.dumps({'prompt': f'p{i}', 'label': {'advice': '持有'}}) for i in range(5)) + '\n')
    dst.write_text('OLD CONTENT\n')
    real, seen = clean.clean_record, []
    def crash_on_third(line):
        seen.append(line)
        if len(seen) == 3: raise KeyboardInterrupt
        return real(line)
    monkeypatch.setattr(clean, 'clean_record', crash_on_third)
    with pytest.raises(KeyboardInterrupt): clean_jsonl(src, dst)
    assert dst.read_text() == 'OLD CONTENT\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name]), 'no temp file left behind'


def test_the_output_is_checked_with_datasets(tmp_path):
    p = tmp_path/'c.jsonl'
    p.write_text(json.dumps({'prompt': 'p', 'label': '{"advice": "持有"}'}) + '\n')
    clean._check_loads(p, 1)
    with pytest.raises(ValueError, match='1 rows'): clean._check_loads(p, 2)


def test_empty_and_missing_files(tmp_path):
    src = tmp_path/'val_labeled_data.jsonl'
    src.write_text('')
    assert clean_jsonl(src, verbose=False) == dict.fromkeys(REASONS, 0) | {'kept': 0}
    assert (tmp_path/'cleaned_val_labeled_data.jsonl').read_text() == '', 'default name: cleaned_<src name>'
    with pytest.raises(FileNotFoundError, match='label_samples'): clean_jsonl(tmp_path/'nope.jsonl')


def test_labels_from_label_samples_clean_as_expected(tmp_path):
    class Mixed(Teacher):
        "Answers by the prompt's number: good, raw text, final error, transient error."
        name = 'mixed'
        def stream(self, prompts):
            for i, p in enumerate(prompts):
                k = int(p.split()[-1]) % 4
                yield i, [{'label': {'prediction': '震荡', 'analysis': p, 'advice': '观望'}, 'reasoning': 'r', 'usage': None, 'error': None},
                          {'label': {'raw': 'no json'}, 'reasoning': None, 'usage': None, 'error': None},
                          {'label': None, 'reasoning': None, 'usage': None, 'error': 'final: HTTP 400: bad'},
                          {'label': None, 'reasoning': None, 'usage': None, 'error': 'transient: HTTP 500 (gave up)'}][k]
    recs = [{'id': f'r{i}', 'prompt': f'prompt {i}', 'code': '600031', 'outcome': {'direction': 'flat'}} for i in range(10)]
    label_samples(recs, Mixed(), tmp_path/'labeled_data.jsonl', progress=False)
    counts = clean_jsonl(tmp_path/'labeled_data.jsonl', verbose=False)
    assert counts == dict.fromkeys(REASONS, 0) | {'kept': 3, 'raw_label': 3, 'teacher_error': 4}
    out = [json.loads(line) for line in (tmp_path/'cleaned_labeled_data.jsonl').read_text(encoding='utf-8').split('\n') if line]
    assert [o['id'] for o in out] == ['r0', 'r4', 'r8']
    assert all(o['code'] == '600031' and o['outcome'] == {'direction': 'flat'} and o['teacher'] == 'mixed' for o in out)
    assert json.loads(out[1]['label'])['analysis'] == 'prompt 4'


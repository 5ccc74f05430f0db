"""Tests of stockdistill.report on hand-built run folders (config.json, metrics.json, lora_adapter/train_summary.json
written in tmp_path) and on the real finished run kept in tests/fixtures/runs/baseline0."""
import json
import re
from pathlib import Path

import pytest

from stockdistill.report import compare_runs, compare_table, differing_settings, verdict, write_report

BASELINE0 = Path(__file__).parent/'fixtures'/'runs'/'baseline0'
BASELINES = ('majority', 'always_up', 'momentum')


def scores(acc, mcc, n=100, **kw):
    "One model's scores on realized moves, as evaluate writes them."
    return dict(n=n, accuracy=acc, mcc=mcc, coverage=1.0, **kw)


def metrics(after_acc=.6, after_mcc=.25, directions=None, n=100):
    "A metrics.json: student before/after, teacher, the three baselines, a sample and per-record directions."
    directions = directions or {'up': 40, 'down': 35, 'flat': 25}
    text = dict(bleu=.3, rougeL=.5, embed=.9, json_valid=.8, fields_complete=.7, direction_agreement=.6,
                per_field={'analysis': dict(bleu=.2, rougeL=.4, embed=.8)})
    before = dict(text, bleu=.01, rougeL=.02, json_valid=0., per_field={'analysis': dict(bleu=0., rougeL=0., embed=.1)},
                  **scores(.2, 0., n), directions={'unknown': n})
    after = dict(text, **scores(after_acc, after_mcc, n), directions=directions,
                 confusion=[[20, 10, 5, 0], [10, 20, 5, 0], [10, 5, 15, 0]])
    return dict(n=n, before=before, after=after, n_outcomes=n, teacher=scores(.5, .15, n),
                baselines=dict(majority=scores(.4, 0., n, **{'class': 'up', 'from': 'train'}),
                               always_up=scores(.4, 0., n), momentum=scores(.45, .1, n)),
                samples=[dict(prompt='股票 600031 近7日K线数据', teacher='{"prediction": "上涨"}', after='{"prediction": "上涨"}',
                              before='乱码')],
                records=[dict(id='a', realized='up', teacher='up', before='unknown', after='up')], split='val')


def make_run(root, name, cfg=None, m=None, summary=True):
    "A run folder as the pipeline leaves it (only the files the report reads)."
    run = Path(root)/name
    (run/'lora_adapter').mkdir(parents=True)
    (run/'config.json').write_text(json.dumps({**dict(run_name=name, windows=16, horizon=5, lr=1e-4, student='tiny',
                                                      teacher='rule', out='lora_adapter'), **(cfg or {})}))
    if m is not False: (run/'metrics.json').write_text(json.dumps(m or metrics(), ensure_ascii=False))
    if summary:
        (run/'lora_adapter'/'train_summary.json').write_text(json.dumps(dict(
            steps=30, epochs=2.0, lr=6e-3, batch_size=4, lora_r=16, resumed_from=None, wall_s=12.5, tokens=50000,
            tokens_per_s=4000.0, trainable_params=203392, losses=[[10, 5.0], [20, 2.0], [30, 1.0]], eval_losses=[[30, 1.2]])))
    return run


SIGNED = r"\([+-]\d\.\d{3}\)"


def test_verdict_beats_every_baseline_with_signed_deltas():
    v = verdict(metrics(.6, .25), horizon=5)
    assert v.startswith('Verdict on 100 windows (realized 5-day move): The tuned student beats all 4 comparisons')
    for who in BASELINES:
        assert re.search(rf"vs baseline {who}\b.*accuracy \d\.\d{{3}} {SIGNED}, MCC [+-]\d\.\d{{3}} {SIGNED} → beats it", v), who
    assert 'vs the teacher: accuracy 0.500 (+0.100), MCC +0.150 (+0.100) → beats it' in v
    assert 'since before tuning: accuracy 0.200 → 0.600 (+0.400), MCC +0.000 → +0.250 (+0.250)' in v
    assert '±0.10' in v and 'one class' not in v and 'WARNING' not in v


def test_verdict_says_plainly_when_the_student_loses():
    v = verdict(metrics(.3, -.05))
    assert 'beats none of: baseline majority, baseline always_up, baseline momentum, the teacher' in v
    assert "vs baseline majority (always 'up'): accuracy 0.400 (-0.100), MCC +0.000 (-0.050) → does NOT beat it" in v
    assert v.count('does NOT beat it') == 4


def test_verdict_mixed_and_partial_wins():
    v = verdict(metrics(.42, .05))   # beats majority and always_up on both measures, momentum and the teacher on neither
    assert 'beats baseline majority, baseline always_up, but not baseline momentum, the teacher' in v
    v = verdict(metrics(.5, .05))    # better accuracy than momentum (.45) but lower MCC (.1)
    assert 'vs baseline momentum: accuracy 0.450 (+0.050), MCC +0.100 (-0.050) → mixed: better accuracy, worse MCC' in v


def test_verdict_flags_a_collapsed_student():
    v = verdict(metrics(.45, .02, directions={'down': 75, 'up': 20, 'flat': 5}))
    assert "answers one class: comparison not meaningful ('down' in 75% of its answers" in v
    assert 'one class' not in verdict(metrics(.45, .02, directions={'down': 70, 'up': 20, 'flat': 10}))   # 70 % is not > 70 %


def test_verdict_without_realized_moves_or_with_few_windows():
    assert verdict(dict(before=dict(bleu=.1), after=dict(bleu=.3))).startswith('No realized moves')
    assert 'Far too few windows' in verdict(metrics(n=4))


def test_verdict_on_the_real_baseline0_run():
    m = json.loads((BASELINE0/'metrics.json').read_text(encoding='utf-8'))
    v = verdict(m, 5)
    assert "answers one class: comparison not meaningful ('down' in 86%" in v and 'on 132 windows' in v
    assert 'vs baseline always_up: accuracy 0.470 (-0.197), MCC +0.000 (-0.074) → does NOT beat it' in v


def test_write_report_of_a_hand_built_folder(tmp_path):
    run = make_run(tmp_path, 'r1', m={**metrics(), 'after': {**metrics()['after'], 'ece': 0.08}})
    (run/'teachers'/'rule').mkdir(parents=True)
    (run/'teachers'/'rule'/'label_summary.json').write_text(json.dumps(
        dict(total=10, kept=8, dropped={'no_json': 1, 'too_short': 1}, errors=0, tokens={'prompt': 900}, model='rule')))
    p = write_report(run)
    assert p == run/'report.html'
    page = p.read_text(encoding='utf-8')
    assert "<meta charset='utf-8'>" in page and '股票 600031' in page
    assert 'class=verdict' in page and 'The tuned student beats all 4 comparisons' in page
    assert page.count('class="plotly-graph-div"') == 5 and page.count('plotly.js v') == 1   # loss, 2 text, confusion, direction
    assert '<th>ece</th>' in page                                                            # an unknown metric, rendered
    assert '<th>dropped.no_json</th><td>1</td>' in page and '<th>tokens.prompt</th><td>900</td>' in page
    assert '<th>lr</th><td class=best>0.006</td><td>1.00e-04</td>' in page                 # as trained vs asked


def test_write_report_tolerates_missing_files(tmp_path):
    run = make_run(tmp_path, 'bare', summary=False)
    m = metrics(); del m['records'], m['samples'], m['teacher'], m['baselines']
    (run/'metrics.json').write_text(json.dumps(m))
    page = write_report(run, tmp_path/'out'/'r.html').read_text(encoding='utf-8')
    assert 'No <code>train_summary.json</code>' in page and 'no baselines or teacher scores' in page
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path/'nothing'))): write_report(tmp_path/'nothing')


def test_write_report_of_the_real_baseline0_run(tmp_path):
    page = write_report(BASELINE0, tmp_path/'report.html').read_text(encoding='utf-8')
    assert page.count('class="plotly-graph-div"') == 5 and 'answers one class: comparison not meaningful' in page
    assert '短期有望温和上行' in page


def test_compare_two_hand_built_runs(tmp_path):
    a = make_run(tmp_path, 'a', cfg=dict(lr=1e-4), m=metrics(.6, .25))
    b = make_run(tmp_path, 'b', cfg=dict(lr=1e-3, seed=1), m=metrics(.3, -.05))
    paths = compare_runs([a, b], tmp_path/'cmp')
    assert set(paths) == {'html', 'json'} and all(p.exists() for p in paths.values())
    data = json.loads(paths['json'].read_text(encoding='utf-8'))
    assert data['settings_differ'] == {'lr': {'a': 1e-4, 'b': 1e-3}, 'seed': {'a': None, 'b': 1}}
    assert data['settings_same'] == dict(windows=16, horizon=5, student='tiny', teacher='rule', out='lora_adapter')
    assert data['metrics']['after.per_field.analysis.rougeL'] == {'a': .4, 'b': .4}
    assert data['metrics']['after.accuracy'] == {'a': .6, 'b': .3}
    assert data['metrics']['baselines.momentum.mcc'] == {'a': .1, 'b': .1}
    assert not any('confusion' in k for k in data['metrics'])
    assert data['training']['train.steps'] == {'a': 30, 'b': 30} and 'train.trainable_params' in data['training']
    assert round(data['realized']['a']['Δacc vs best baseline'], 6) == .15
    assert 'beats all 4' in data['verdicts']['a'] and 'beats none' in data['verdicts']['b']
    page = paths['html'].read_text(encoding='utf-8')
    assert page.count('class="plotly-graph-div"') == 2 and page.count('plotly.js v') == 1
    assert '<th>after.accuracy</th><td class=best>0.6</td><td>0.3</td>' in page     # best value per row highlighted
    assert '<th>after.per_field.analysis.rougeL</th><td>0.4</td><td>0.4</td>' in page  # a tie: nothing highlighted
    differ_table = page.split('Settings that differ')[1].split('Same in all runs')[0]
    assert '<th>lr</th>' in differ_table and '<th>seed</th>' in differ_table and '<th>windows</th>' not in differ_table


def test_compare_table_rows_metrics_columns_runs(tmp_path):
    a, b = make_run(tmp_path, 'a'), make_run(tmp_path, 'b', m=metrics(.3, -.05))
    df = compare_table([a, b])
    assert list(df.columns) == ['a', 'b']
    assert df.loc['after.mcc'].tolist() == [.25, -.05] and df.loc['train.wall_s'].tolist() == [12.5, 12.5]


def test_compare_runs_same_folder_names_get_parent_names(tmp_path):
    a, b = make_run(tmp_path/'x', 'run'), make_run(tmp_path/'y', 'run')
    assert list(compare_table([a, b]).columns) == ['x/run', 'y/run']


def test_compare_with_a_run_missing_metrics_writes_nothing(tmp_path):
    a, broken = make_run(tmp_path, 'a'), make_run(tmp_path, 'broken', m=False)
    with pytest.raises(FileNotFoundError, match=f"no metrics.json in run folder {re.escape(str(broken))}"):
        compare_runs([a, broken], tmp_path/'cmp')
    assert not (tmp_path/'cmp').exists()
    with pytest.raises(ValueError, match='no run folders'): compare_runs([], tmp_path/'cmp')


def test_differing_settings_compares_lists_and_missing_keys():
    differ, same = differing_settings({'a': dict(run_name='a', target_modules=['q', 'v'], lr=1),
                                       'b': dict(run_name='b', target_modules=['q', 'v'], lr=1, rope_factor=2.0)})
    assert differ == {'rope_factor': {'a': None, 'b': 2.0}} and same == {'target_modules': ['q', 'v'], 'lr': 1}

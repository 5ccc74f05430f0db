"""Tests of stockdistill.backtest: each A-share rule on hand-built bars, a property test that no trade uses a bar after
the day it looks at, the bootstrap and paired test on the real finished run of tests/fixtures/runs/baseline0 (its
prompts rebuilt from its settings), the pipeline's and the CLI's backtest, and walk-forward end to end with the
student's training and evaluation replaced by stand-ins."""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from stockdistill import distill
from stockdistill.backtest import (BASELINES, Costs, Market, backtest, backtest_step, block_indices, check_settings,
                                   BacktestSettings, fold_periods, limit_prices, lot_shares, paired_test, price_limit,
                                   run_backtest, run_decisions, run_market, trade_decisions, walk_forward)
from stockdistill.cli import main
from stockdistill.config import DistillConfig
from stockdistill.dataset import build_dataset, read_jsonl
from stockdistill.evaluate import answer_direction, save_metrics
from stockdistill.report import write_report
from stockdistill.teacher import RuleTeacher, read_labels

BASELINE0 = Path(__file__).parent/'fixtures'/'runs'/'baseline0'


def hand_bars(rows, start='2024-03-04'):
    "Bars from (open, close) pairs on consecutive weekdays; a None row is a day without a bar (suspended)."
    dates = pd.bdate_range(start, periods=len(rows))
    keep = [(d, r) for d, r in zip(dates, rows) if r is not None]
    o, c = (np.array([r[k] for _, r in keep], float) for k in (0, 1))
    return pd.DataFrame(dict(date=[d for d, _ in keep], open=o, close=c, high=np.maximum(o, c), low=np.minimum(o, c),
                             volume=1e4))


FLAT = [(10.0, 10.0)]*8


# --- the rules, one by one ------------------------------------------------------------------------------------------

def test_limit_up_open_blocks_a_buy_and_the_next_day_does_not():
    m = Market({'600000': hand_bars([(10.0, 10.0), (11.0, 11.0), (11.5, 11.5), *FLAT[:5]])})
    assert m.trade('600000', 1, 3, 10_000)['status'] == 'limit_up'     # 11.00 = 10.00 x 1.1
    assert m.trade('600000', 2, 4, 10_000)['status'] == 'filled'       # 11.50 < 12.10


def test_a_just_below_limit_up_open_is_bought():
    m = Market({'600000': hand_bars([(10.0, 10.0), (10.99, 10.99), *FLAT[:4]])})
    assert m.trade('600000', 1, 3, 10_000)['status'] == 'filled'


def test_star_and_chinext_limits_by_date():
    assert price_limit('STAR', '2019-07-22') == 0.2
    assert [price_limit('ChiNext', d) for d in ('2020-08-21', '2020-08-24')] == [0.1, 0.2]
    # +10 % opens on 2020-08-21 (the Friday before the ChiNext reform) and on 2020-08-24 (its first day)
    rows = [(10.0, 10.0), (11.0, 10.0), (11.0, 11.0), *FLAT[:3]]
    m = Market({'300001': hand_bars(rows, start='2020-08-20'), '688001': hand_bars(rows, start='2020-08-20')})
    assert m.trade('300001', 1, 3, 10_000)['status'] == 'limit_up'    # ChiNext ±10 % then
    assert m.trade('688001', 1, 3, 10_000)['status'] == 'filled'      # STAR ±20 % from the start
    assert m.trade('300001', 2, 4, 10_000)['status'] == 'filled'      # ChiNext ±20 % from the reform day
    assert m.stocks['300001']['limit_up'][1:3].tolist() == [11.0, 12.0]


def test_st_limit_is_five_percent_on_main_boards_only():
    assert price_limit('SH main', '2024-01-02', st=True) == 0.05
    assert price_limit('STAR', '2024-01-02', st=True) == 0.2
    m = Market({'600000': hand_bars([(10.0, 10.0), (10.5, 10.5), *FLAT[:4]])}, st=['600000'])
    assert m.trade('600000', 1, 3, 10_000)['status'] == 'limit_up'


def test_limit_down_open_delays_a_sell():
    m = Market({'600000': hand_bars([*FLAT[:3], (9.0, 9.0), (9.0, 9.2), *FLAT[:3]])})
    t = m.trade('600000', 1, 3, 10_000)
    assert (t['exit'], t['exit_delayed'], t['sell_value']) == (4, True, t['shares']*9.0)


def test_t_plus_one_blocks_a_same_day_sell():
    m = Market({'600000': hand_bars(FLAT)})
    t = m.trade('600000', 2, 2, 10_000)           # asked to sell on the day it bought
    assert t['planned_exit'] == 3 and t['exit'] == 3 and t['days'] == [2, 3]


def test_suspended_day_means_no_buy_and_a_later_sell():
    m = Market({'600000': hand_bars([*FLAT[:3], None, *FLAT[:4]]), '600001': hand_bars(FLAT)})
    assert m.trade('600000', 3, 5, 10_000)['status'] == 'suspended'
    t = m.trade('600000', 1, 3, 10_000)
    assert (t['exit'], t['exit_delayed']) == (4, True)


def test_stamp_duty_halves_on_2023_08_28():
    c = Costs(commission=0.0, min_commission=0.0)
    fri, mon = c.order(1e6, 'sell', '2023-08-25'), c.order(1e6, 'sell', '2023-08-28')
    assert fri == pytest.approx(1000 + 10) and mon == pytest.approx(500 + 10)   # duty + transfer fee (0.001 %)
    assert c.order(1e6, 'buy', '2023-08-25') == pytest.approx(10)                # no duty on buys
    m = Market({'600000': hand_bars([(10.0, 10.0)]*6, start='2023-08-21')})
    t1 = m.trade('600000', 0, 4, 1e6, c)                                          # sold Friday 2023-08-25
    t2 = m.trade('600000', 0, 5, 1e6, c)                                          # sold Monday 2023-08-28
    assert t1['costs'] - t2['costs'] == pytest.approx(t1['sell_value']*0.0005)


def test_commission_minimum_and_transfer_fee_change():
    c = Costs()
    assert c.order(1000, 'buy', '2022-04-28') == pytest.approx(5 + 0.02)
    assert c.order(1000, 'buy', '2022-04-29') == pytest.approx(5 + 0.01)
    assert c.order(1e6, 'buy', '2024-01-02') == pytest.approx(250 + 10)


def test_lot_rounding():
    assert lot_shares(10_000, 9.99, 'SH main') == 1000
    assert lot_shares(10_000, 10.01, 'SZ main') == 900
    assert lot_shares(999, 10, 'ChiNext') == 0
    assert lot_shares(10_000, 45.0, 'STAR') == 222 and lot_shares(8_000, 45.0, 'STAR') == 0
    m = Market({'600000': hand_bars(FLAT), '688000': hand_bars(FLAT)})
    assert m.trade('600000', 1, 3, 10_000)['shares'] == 900      # 999 affordable after costs → 9 lots
    assert m.trade('688000', 1, 3, 1_900)['status'] == 'no_lot'


def test_limit_prices_round_half_up_to_the_tick():
    assert limit_prices(9.95, 0.1) == (8.96, 10.95)
    assert limit_prices(12.35, 0.2) == (9.88, 14.82)


def test_ex_rights_day_is_not_a_loss():
    # a 10-for-10 bonus issue: the price halves overnight, the holder has twice the shares
    m = Market({'600000': hand_bars([(10.0, 10.0), (10.0, 10.0), (5.0, 5.0), (5.0, 5.0), (5.0, 5.0)])})
    t = m.trade('600000', 1, 4, 100_000, Costs(0, 0))
    assert t['status'] == 'filled' and t['pnl'] == pytest.approx(-t['costs'])   # no gain, no loss: only the costs
    assert t['sell_value'] == pytest.approx(t['buy_value'])


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match='--backtest-commission'): check_settings(BacktestSettings(backtest_commission=-1))
    with pytest.raises(ValueError, match='--backtest-embargo'): check_settings(BacktestSettings(backtest_embargo=1), 5)
    with pytest.raises(ValueError, match='leaves less than one fold'): fold_periods(1212, 5, 0.2)


# --- no trade uses a bar after the day it looks at --------------------------------------------------------------------

def random_bars(rng, n, start='2024-01-02'):
    "A random walk of closes inside the ±10 % limit, opens inside it too, and some days without a bar."
    close = [10.0]
    for _ in range(n - 1): close.append(round(close[-1]*(1 + rng.uniform(-0.11, 0.11)), 2))
    close = np.maximum(np.array(close), 0.5)
    prev = np.concatenate([[10.0], close[:-1]])
    opn = np.round(prev*(1 + rng.uniform(-0.1, 0.1, n)), 2)
    bars = pd.DataFrame(dict(date=pd.bdate_range(start, periods=n), open=opn, close=close,
                             high=np.maximum(opn, close), low=np.minimum(opn, close), volume=1e4))
    return bars[rng.uniform(size=n) > 0.1].reset_index(drop=True)


def rewrite(bars, day, rng, from_close=False):
    "Every price after `day` moved at random by up to ±20 % (limit opens, ex-days too); with `from_close`, `day`'s close too."
    out = {}
    for c, b in bars.items():
        b2 = b.copy()
        for k in ('open', 'close'):
            late = (b2['date'] > day) | ((b2['date'] == day) & from_close & (k == 'close'))
            b2.loc[late, k] = np.round(b2.loc[late, k]*rng.uniform(0.8, 1.2, late.sum()), 2)
        b2['high'], b2['low'] = b2[['open', 'close']].max(axis=1), b2[['open', 'close']].min(axis=1)
        out[c] = b2
    return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), horizon=st.integers(1, 6))
def test_no_position_uses_a_bar_after_its_day(seed, horizon):
    rng = np.random.default_rng(seed)
    codes = ['600000', '300000', '688000']
    bars = {c: random_bars(rng, 30) for c in codes}
    cal = pd.DatetimeIndex(sorted(set().union(*[set(b['date']) for b in bars.values()])))
    decisions = pd.DataFrame([dict(code=c, end=d) for c in codes for d in bars[c]['date'] if d < cal[-2]]).sample(
        frac=0.5, random_state=seed % 1000).sort_values('end')
    g1 = trade_decisions(decisions, Market(bars), horizon, buy_and_hold=False)
    for t, e in zip(g1['trades'], decisions['end']):
        assert cal[t['entry']] > e                                    # bought after the day it was decided on
        if t['exit'] is not None: assert t['exit'] > t['entry']      # T+1 (None: still held when the bars end)
    for cut in range(len(cal) - 1):
        # the future after each day rewritten in turn: nothing up to that day may change
        g2 = trade_decisions(decisions, Market(rewrite(bars, cal[cut], rng)), horizon, buy_and_hold=False)
        k = cut - g1['start'] + 1     # grid columns up to and including that day
        if k > 0:
            assert np.allclose(g1['pnl'][:, :k], g2['pnl'][:, :k]), cut
            assert np.allclose(g1['value'][:, :k], g2['value'][:, :k]), cut
        # that day's close rewritten too: what was done at its open (buy, how many shares, sell) may not change
        g3 = trade_decisions(decisions, Market(rewrite(bars, cal[cut], rng, from_close=True)), horizon, buy_and_hold=False)
        for t1, t2, t3 in zip(g1['trades'], g2['trades'], g3['trades']):
            if t1['entry'] <= cut:
                assert (t1['status'], t1['shares']) == (t2['status'], t2['shares']) == (t3['status'], t3['shares']), cut
                sold = lambda t: t['exit'] is not None and t['exit'] <= cut
                assert sold(t1) == sold(t3) and (not sold(t1) or t1['exit'] == t3['exit']), cut


# --- the real run: bootstrap, paired test, pipeline step, report, command ----------------------------------------------

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "The baseline0 run folder with its prompts rebuilt from its settings (same seed, same ids)."
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = {k: v for k, v in json.loads((BASELINE0/'config.json').read_text()).items() if k in known}
    root = tmp_path_factory.mktemp('runs')
    cfg = DistillConfig().replace(**{**cfg, 'runs_dir': str(root), 'run_name': 'baseline0'})
    shutil.copytree(BASELINE0, cfg.run_dir)
    cfg.save()
    build_dataset(cfg, write=True, verbose=False)
    return cfg


@pytest.fixture(scope='module')
def market(run): return run_market(run)


def test_decisions_join_the_records_by_id(run):
    d = run_decisions(run)
    m = json.loads(run.metrics_file.read_text())
    assert len(d) == 132 and d.attrs['unmatched'] == 0
    assert d['after'].tolist() == [r['after'] for r in m['records']]
    prompts = {r['id']: r for r in read_jsonl(run.prompts_file('val'))}
    assert all(prompts[i]['code'] == c and prompts[i]['end'] == e for i, c, e in zip(d['id'], d['code'], d['end']))
    assert (d['always_up'] == 'up').all() and set(d['majority']) == {m['baselines']['majority']['class']}


def test_perfect_predictor_interval_excludes_the_baselines(run, market):
    d = run_decisions(run)
    d['perfect'] = d['realized']
    bt = backtest(d, market, ['perfect', *BASELINES], horizon=run.horizon, n_boot=300)
    for k in ('accuracy', 'mcc'):
        lo = bt['strategies']['perfect']['ci'][k][0]
        assert lo > max(bt['strategies'][b]['ci'][k][1] for b in BASELINES), k
    assert bt['strategies']['perfect']['ci']['accuracy'] == [1.0, 1.0]


def test_paired_test_separates_an_oracle_and_not_a_copy(run, market):
    d = run_decisions(run)
    g = trade_decisions(d, market, run.horizon)
    d['oracle'] = ['up' if t['pnl'] > 0 else 'down' for t in g['trades']]
    assert paired_test(g, d, 'oracle', 'always_up', n_perm=300)['sharpe']['p'] < 0.01
    assert all(v['p'] == 1.0 for v in paired_test(g, d, 'momentum', 'momentum', n_perm=300).values())


def test_backtest_is_deterministic_and_matches_evaluate(run, market):
    d = run_decisions(run)
    a, b = (backtest(d, market, horizon=run.horizon, n_boot=200) for _ in range(2))
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    m = json.loads(run.metrics_file.read_text())
    for s in ('after', 'before', 'teacher'):
        assert a['strategies'][s]['accuracy'] == pytest.approx(m[s]['accuracy'])
        assert a['strategies'][s]['mcc'] == pytest.approx(m[s]['mcc'])
    assert a['strategies']['momentum']['accuracy'] == pytest.approx(m['baselines']['momentum']['accuracy'])
    assert a['strategies']['buy_and_hold']['n_trades'] == 40


def test_block_bootstrap_keeps_blocks_and_seed():
    idx = block_indices(30, 50, 7, seed=3)
    assert idx.shape == (50, 30) and (idx == block_indices(30, 50, 7, seed=3)).all()
    assert ((np.diff(idx[:, :7], axis=1) % 30) == 1).all()


def test_backtest_step_writes_json_metrics_and_report(run, market, capsys):
    m = json.loads(run.metrics_file.read_text())
    bt = backtest_step(run, m, market)
    assert '[backtest] 132 val decisions traded' in capsys.readouterr().out
    saved = json.loads(run.metrics_file.read_text())
    assert saved['backtest']['after']['n_trades'] == bt['strategies']['after']['n_trades']
    assert json.loads(run.path('backtest.json').read_text())['period'] == bt['period']
    page = write_report(run.run_dir).read_text()
    assert 'Backtest under A-share rules' in page and 'buy and hold' in page


def test_report_without_plotly_keeps_the_backtest_table(run, market, monkeypatch):
    backtest_step(run, json.loads(run.metrics_file.read_text()), market)
    monkeypatch.setitem(sys.modules, 'plotly', None)                 # a GPU box without plotly
    monkeypatch.setitem(sys.modules, 'plotly.graph_objects', None)
    page = write_report(run.run_dir).read_text()
    assert 'Backtest under A-share rules' in page and 'buy and hold' in page and 'equity curves are left out' in page


def test_report_without_backtest_has_no_section(run, tmp_path):
    other = tmp_path/'plain'
    shutil.copytree(BASELINE0, other)
    assert 'Backtest under A-share rules' not in write_report(other).read_text()


def test_cli_backtest_retrades_at_other_costs(run):
    cheap = run_backtest(run, write=False)
    main(['backtest', '--runs-dir', run.runs_dir, '--run-name', run.run_name, '--backtest-commission', '0.003',
          '--backtest-boot', '200'])
    dear = json.loads(run.path('backtest.json').read_text())
    assert dear['costs']['commission'] == 0.003 and dear['n_boot'] == 200
    assert dear['strategies']['always_up']['costs'] > 3*cheap['strategies']['always_up']['costs']


def test_cli_backtest_without_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(['backtest', '--runs-dir', str(tmp_path), '--run-name', 'none'])
    assert e.value.code == 2 and 'no metrics.json' in capsys.readouterr().err


def test_no_records_skips_the_backtest(run, capsys):
    assert backtest_step(run, {'records': []}) is None
    assert 'skipped' in capsys.readouterr().out


# --- walk-forward end to end, student stand-ins ------------------------------------------------------------------------

class CountingTeacher(RuleTeacher):
    "The rule teacher, counting the prompts it is asked."
    asked = []

    def stream(self, prompts):
        CountingTeacher.asked += list(prompts)
        yield from super().stream(prompts)


def fake_train(cfg, cleaned, resume=True):
    assert all(not c.get('val') and c['train'] for c in cleaned.values())   # the test period is not a validation set
    return dict(steps=0, base=None)


def fake_evaluate(cfg, cleaned, summary):
    "Metrics as evaluate writes them: the student 'after' copies the teacher, 'before' knows nothing."
    first = cleaned[next(iter(cleaned))]
    recs = read_jsonl(first['val']['path'])
    train = [r['outcome']['direction'] for r in read_jsonl(first['train']['path'])]
    m = dict(n=len(recs), split='val', before={}, after={}, baselines={'majority': {'class': max(set(train), key=train.count)}},
             records=[dict(id=r['id'], realized=r['outcome']['direction'], teacher=answer_direction(r['label']),
                           before='unknown', after=answer_direction(r['label'])) for r in recs])
    save_metrics(m, cfg.metrics_file)
    return m


def test_walk_forward_folds_embargo_and_labels_bought_once(tmp_path, monkeypatch):
    monkeypatch.setattr(distill, 'train_step', fake_train)
    monkeypatch.setattr(distill, 'evaluate_step', fake_evaluate)
    CountingTeacher.asked = []
    cfg = DistillConfig(runs_dir=str(tmp_path), run_name='wf', codes=['600031', '000002', '300014', '688981'], windows=20,
                        max_tokens=900).replace(backtest_boot=200)
    res = walk_forward(cfg, 3, teacher=CountingTeacher())
    pool = read_jsonl(cfg.prompts_file('train'))
    assert len(CountingTeacher.asked) == len(pool) == len(set(CountingTeacher.asked))    # every window asked once
    market = run_market(cfg)
    tests = []
    for f in res['folds']:
        run = Path(f['run_dir'])
        lo = market.day(f['test'][0])
        for r in read_jsonl(run/'prompts_train.jsonl'):       # outcome more than `embargo` days before the test period
            s = market.stocks[r['code']]
            row = int(np.searchsorted(s['pos'], market.day(r['end'])))
            assert s['pos'][row + cfg.horizon] < lo - res['embargo']
        test = read_jsonl(run/'prompts_val.jsonl')
        assert all(f['test'][0] <= r['end'] <= f['test'][1] for r in test)
        tests.append(f['test'])
        root = {r['id']: r['label'] for r in read_labels(cfg.labels_file('train', 'rule'))}
        for r in read_labels(run/'teachers'/'rule'/'labeled_data.jsonl') + read_labels(run/'teachers'/'rule'/'val_labeled_data.jsonl'):
            assert r['label'] == root[r['id']]                 # copies of the walk-forward's labels
        for name in ('config.json', 'metrics.json', 'backtest.json', 'report.html', 'dataset_stats.json'): assert (run/name).exists()
    assert [t[0] for t in tests] == sorted(t[0] for t in tests) and all(a[1] < b[0] for a, b in zip(tests, tests[1:]))
    assert tests[-1][0].startswith('2024-01') and tests[0][0].startswith('2022-01')
    combined = json.loads(cfg.path('backtest.json').read_text())
    assert combined['decisions'] == sum(f['windows']['test'] for f in res['folds'])
    assert (tmp_path/'wf'/'walkforward.html').exists() and json.loads(cfg.path('walkforward.json').read_text())['folds']
    # run again: the labels are reused, no teacher is asked
    CountingTeacher.asked = []
    walk_forward(cfg.replace(overwrite=False), 3, teacher=CountingTeacher())
    assert CountingTeacher.asked == []


def test_walk_forward_refuses_a_random_split(tmp_path):
    with pytest.raises(ValueError, match='--split time'):
        walk_forward(DistillConfig(runs_dir=str(tmp_path), split='random', codes=['600031']), 2)

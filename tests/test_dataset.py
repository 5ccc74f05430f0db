"Property and golden tests of stockdistill.dataset: exact prompts, no look-ahead, leak-free splits, token budgets."
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stockdistill.data import load_bars
from stockdistill.dataset import SPLITS, build_dataset, class_counts, make_record, read_jsonl
from stockdistill.prompt import (INDICATOR_DECIMALS, PRICE_FIELDS, count_tokens, fit_prompt, format_change, make_prompt,
                                 parse_prompt, window_change, window_slice)

FIXTURES = Path(__file__).parent/'fixtures'
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_bars(n, seed, first='2020-01-02', gaps=True):
    "Random but valid daily bars: a log-normal walk on business days, some days missing (suspensions)."
    rng = np.random.default_rng(seed)
    days = pd.bdate_range(first, periods=int(n*1.3) + 5)
    days = days[np.sort(rng.choice(len(days), size=n, replace=False))] if gaps else days[:n]
    close = np.round(np.maximum(0.5, 10*np.exp(np.cumsum(rng.normal(0, 0.02, n)))), 2)
    open_ = np.round(np.maximum(0.5, close*np.exp(rng.normal(0, 0.01, n))), 2)
    high = np.round(np.maximum(open_, close)*(1 + rng.uniform(0, 0.02, n)), 2)
    low = np.round(np.maximum(0.01, np.minimum(open_, close)*(1 - rng.uniform(0, 0.02, n))), 2)
    vol = rng.integers(1, 2_000_000, n).astype('int64')
    return pd.DataFrame({'date': days, 'open': open_, 'close': close, 'high': high, 'low': low, 'volume': vol})


def universe(seed, n_stocks=3, n=160):
    "A few random stocks; some start later than others, so the global calendar differs from each stock's."
    rng = np.random.default_rng(seed)
    firsts = ['2020-01-02', '2020-02-03', '2020-03-02']
    return {f'{600000 + i:06d}': random_bars(int(n + rng.integers(-20, 20)), seed*10 + i, firsts[i % 3])
            for i in range(n_stocks)}


def prompt_dates(prompt):
    return list(parse_prompt(prompt)[1]['date'])


def rows_of(bars, rec):
    "Row positions of a record's first and last day in its stock's bars."
    d = bars['date']
    return int(d.searchsorted(pd.Timestamp(rec['start']))), int(d.searchsorted(pd.Timestamp(rec['end'])))


def build(bars, **kw):
    kw = {'windows': 4, 'window': 10, 'horizon': 3, 'verbose': False, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # balancing warns when a class is absent in a tiny universe
        return build_dataset(bars=bars, **kw)


def records(ds): return [r for sp in SPLITS for r in ds[sp]]


# ---------------------------------------------------------------- prompt format

@SETTINGS
@given(n=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_parse_inverts_make(n, seed):
    bars = random_bars(n, seed)
    p = make_prompt('600031', bars)
    code, got, chg = parse_prompt(p)
    assert code == '600031'
    assert chg == float(format_change(window_change(bars))[:-1])
    pd.testing.assert_frame_equal(got, bars[['date', *PRICE_FIELDS, 'volume']].reset_index(drop=True), check_dtype=False)
    assert got['volume'].dtype == 'int64' and got['date'].dtype.kind == 'M'
    assert make_prompt(code, got, chg) == p
    assert f'近{n}日' in p and p.count('"date"') == n


@FEW
@given(n=st.integers(2, 80), seed=st.integers(0, 2**31))
def test_parse_inverts_make_with_indicators(n, seed):
    "Indicator fields (NaN during warm-up shown as null) survive the round trip, rounded as documented."
    bars = random_bars(n, seed)
    wb = window_slice(bars, max(0, n - 30), n - 1, indicators=True)
    p = make_prompt('000002', wb, indicators=True)
    _, got, _ = parse_prompt(p)
    assert list(got.columns) == ['date', *PRICE_FIELDS, 'volume', *INDICATOR_DECIMALS]
    for c, nd in INDICATOR_DECIMALS.items():
        np.testing.assert_allclose(got[c].to_numpy(), wb[c].to_numpy(), rtol=0, atol=10**-nd/2 + 1e-9)  # within half a unit
        assert got[c].isna().tolist() == wb[c].isna().tolist()
    assert make_prompt('000002', got, indicators=True) == p
    assert 'NaN' not in p  # not valid JSON; warm-up gaps are null


def test_parse_rejects_foreign_text():
    with pytest.raises(ValueError, match="no '股票 <code>"): parse_prompt('请分析贵州茅台')
    p = make_prompt('600031', random_bars(3, 0))
    with pytest.raises(ValueError, match='近5日 but lists 3 days'): parse_prompt(p.replace('近3日', '近5日'))


def test_golden_prompt():
    "The prompt for 600031's 30 days ending 2024-06-28 is exactly the checked-in one (with and without indicators)."
    bars = load_bars('600031')
    end = int(bars.index[bars.date == '2024-06-28'][0])
    plain = make_record('600031', bars, end - 29, end)
    golden = (FIXTURES/'golden_prompt_600031_20240628.txt').read_text(encoding='utf-8')
    assert plain['prompt'] == golden
    assert (plain['start'], plain['end'], plain['n_days']) == ('2024-05-17', '2024-06-28', 30)
    ind = make_record('600031', bars, end - 29, end, indicators=True)['prompt']
    assert ind == (FIXTURES/'golden_prompt_600031_20240628_indicators.txt').read_text(encoding='utf-8')
    # spot-check the golden text against the raw CSV row and the stated change
    assert '{"date": "2024-06-28", "open": 16.2, "close": 16.5, "high": 16.62, "low": 16.12, "volume": 502143}' in golden
    assert '涨跌幅: -3.23%。' in golden  # 16.50 / 17.05 - 1


# ---------------------------------------------------------------- no look-ahead

@FEW
@given(seed=st.integers(0, 2**31), indicators=st.booleans(), data=st.data())
def test_outcome_uses_only_bars_after_end(seed, indicators, data):
    "Bars after end+horizon change nothing; bars in (end, end+horizon] change only the outcome; the prompt stops at end."
    n, window, horizon = 90, 20, 5
    bars = random_bars(n, seed)
    end = data.draw(st.integers(window - 1, n - 1 - horizon), label='end')
    start = end - window + 1
    rec = make_record('600031', bars, start, end, horizon=horizon, indicators=indicators)
    assert all(d <= pd.Timestamp(rec['end']) for d in prompt_dates(rec['prompt']))
    assert prompt_dates(rec['prompt']) == list(bars['date'].iloc[start:end + 1])
    c = bars['close']
    assert rec['outcome']['forward_return'] == round((c[end + horizon]/c[end] - 1)*100, 4)

    far = bars.copy()
    far.loc[end + horizon + 1:, ['open', 'close', 'high', 'low']] *= 1.7
    far.loc[end + horizon + 1:, 'volume'] += 12345
    assert make_record('600031', far, start, end, horizon=horizon, indicators=indicators) == rec

    near = bars.copy()
    near.loc[end + 1:end + horizon, ['open', 'close', 'high', 'low']] *= 1.5
    moved = make_record('600031', near, start, end, horizon=horizon, indicators=indicators)
    assert moved['prompt'] == rec['prompt'] and moved['id'] == rec['id']
    assert moved['outcome']['forward_return'] != rec['outcome']['forward_return']


@FEW
@given(seed=st.integers(0, 2**31))
def test_build_ignores_the_future(seed):
    "Changing every price after a date T leaves every record whose outcome day is before T unchanged."
    bars = universe(seed)
    ds = build(bars, balance=False, val_ratio=0.3, indicators=bool(seed % 2))
    cut = pd.Timestamp(sorted(r['end'] for r in records(ds))[len(records(ds))//2])
    changed = {c: b.assign(**{f: np.where(b['date'] > cut, b[f]*1.3, b[f]) for f in PRICE_FIELDS}) for c, b in bars.items()}
    ds2 = build(changed, balance=False, val_ratio=0.3, indicators=bool(seed % 2))
    assert [r['id'] for r in records(ds2)] == [r['id'] for r in records(ds)]  # windows depend on dates, not prices
    safe = 0
    for a, b in zip(records(ds), records(ds2)):
        s, e = rows_of(bars[a['code']], a)
        label_day = bars[a['code']]['date'].iloc[e + 3]
        if label_day <= cut: assert a == b; safe += 1
        elif pd.Timestamp(a['end']) <= cut: assert a['prompt'] == b['prompt']
    assert safe > 0


# ---------------------------------------------------------------- splits

def calendar_of(bars): return pd.DatetimeIndex(np.unique(np.concatenate([b['date'].values for b in bars.values()])))


@FEW
@given(seed=st.integers(0, 2**31), windows=st.integers(1, 6), val=st.sampled_from([0.1, 0.2, 0.3]),
       test=st.sampled_from([0.0, 0.15, 0.25]), overlap=st.booleans())
def test_time_splits_are_separated_with_embargo(seed, windows, val, test, overlap):
    horizon = 3
    bars = universe(seed, n_stocks=4)
    ds = build(bars, windows=windows, val_ratio=val, test_ratio=test, overlap=overlap, balance=False, horizon=horizon)
    cal = calendar_of(bars)
    pos = lambda d: int(cal.searchsorted(pd.Timestamp(d)))

    def extent(recs):
        "(first start, last end, last outcome day) in calendar positions."
        outs = [pos(bars[r['code']]['date'].iloc[rows_of(bars[r['code']], r)[1] + horizon]) for r in recs]
        return min(pos(r['start']) for r in recs), max(pos(r['end']) for r in recs), max(outs)

    present = [sp for sp in SPLITS if ds[sp]]
    for a, b in zip(present, present[1:]):
        _, a_end, a_out = extent(ds[a])
        b_start, _, _ = extent(ds[b])
        assert a_out < b_start, (a, b)              # every outcome of the earlier split is known before the later starts
        assert b_start - a_end > horizon, (a, b)    # embargo of more than `horizon` trading days
    # no window straddles its period, and the split sizes follow the ratios
    for sp in present:
        lo, hi = ds['stats']['periods'][sp]
        assert all(lo <= r['start'] and r['end'] <= hi for r in ds[sp])
    n = len(records(ds)) + ds['stats']['no_room']
    assert n == windows*len(bars)
    if windows*val >= 1 and ds['stats']['no_room'] == 0: assert ds['val']  # each stock's whole share is placed
    for r in records(ds):
        s, e = rows_of(bars[r['code']], r)
        assert e - s + 1 == r['n_days'] == 10
    if not overlap:
        for c in bars:
            rs = sorted((r for r in records(ds) if r['code'] == c), key=lambda r: r['start'])
            assert all(x['end'] < y['start'] for x, y in zip(rs, rs[1:]))


@FEW
@given(seed=st.integers(0, 2**31), base=st.integers(0, 1000))
def test_same_seed_same_records_and_stocks_are_independent(seed, base):
    bars = universe(seed)
    a, b = build(bars, seed=base), build(bars, seed=base)
    assert a == b
    assert [r['id'] for r in records(build(bars, seed=base + 1))] != [r['id'] for r in records(a)]
    # adding a stock on the same calendar does not move the windows of the others
    first = next(iter(bars))
    more = {**bars, '688999': random_bars(len(bars[first]), seed + 1).assign(date=bars[first]['date'].values)}
    before = {r['id'] for r in records(build(bars, seed=base, balance=False))}
    after = {r['id'] for r in records(build(more, seed=base, balance=False)) if r['code'] != '688999'}
    assert before == after


def test_random_split_warns_and_mixes_time():
    bars = universe(3, n_stocks=4, n=300)
    with pytest.warns(UserWarning, match='leaks future information'):
        ds = build_dataset(bars=bars, windows=10, window=10, horizon=3, split='random', balance=False, verbose=False)
    assert len(ds['val']) == 8 and len(ds['train']) == 32
    assert min(r['start'] for r in ds['val']) < max(r['end'] for r in ds['train'])


# ---------------------------------------------------------------- token budget

@SETTINGS
@given(seed=st.integers(0, 2**31), budget=st.integers(400, 4000), indicators=st.booleans())
def test_max_tokens_characters(seed, budget, indicators):
    "The prompt fits, only the earliest days are dropped, and one more day would not fit."
    bars = random_bars(60, seed)
    wb = window_slice(bars, 20, 59, indicators=indicators)
    one_day = len(make_prompt('600031', wb.iloc[-1:], indicators=indicators))
    if budget < one_day:
        with pytest.raises(ValueError, match=f'max_tokens={budget} is too small: the prompt for 600031'):
            fit_prompt('600031', wb, budget, indicators=indicators)
        return
    p, n = fit_prompt('600031', wb, budget, indicators=indicators)
    assert len(p) <= budget and f'近{n}日' in p
    assert prompt_dates(p) == list(wb['date'].iloc[-n:])
    if n < len(wb): assert len(make_prompt('600031', wb.iloc[-n - 1:], indicators=indicators)) > budget
    assert p.endswith(make_prompt('600031', wb.iloc[-1:]).split('\n')[1].split('%')[1])  # instruction intact


@pytest.fixture(scope='module')
def bpe_tokenizer():
    "A real HF fast tokenizer: byte-level BPE trained here on a few prompts (no hub)."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [make_prompt('600031', window_slice(random_bars(30, s), 0, 29, bool(s % 2)), indicators=bool(s % 2)) for s in range(8)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@FEW
@given(seed=st.integers(0, 2**31), budget=st.integers(150, 2500))
def test_max_tokens_real_tokenizer(bpe_tokenizer, seed, budget):
    bars = universe(seed, n_stocks=2)
    one_day = min(count_tokens(make_prompt(c, b.iloc[-1:]), bpe_tokenizer) for c, b in bars.items())
    if budget < one_day + 40: budget = one_day + 40  # leave room for at least a day in every window
    ds = build(bars, max_tokens=budget, tokenizer=bpe_tokenizer, window=30)
    assert ds['stats']['counted'] == 'tokens'
    for r in records(ds):
        assert len(bpe_tokenizer(r['prompt'])['input_ids']) <= budget
        b = bars[r['code']]
        s, e = rows_of(b, r)
        assert e - s + 1 == r['n_days'] and prompt_dates(r['prompt'])[-1] == pd.Timestamp(r['end'])
        if r['n_days'] < 30:  # one more early day would not have fitted
            assert count_tokens(make_prompt(r['code'], b.iloc[s - 1:e + 1]), bpe_tokenizer) > budget


def test_max_tokens_error_names_the_window():
    bars = universe(1, n_stocks=1)
    with pytest.raises(ValueError, match=r'max_tokens=20 is too small: the prompt for 600000 \(window \d{4}-\d\d-\d\d'):
        build(bars, max_tokens=20)


# ---------------------------------------------------------------- balancing, files, errors

def test_balancing_equalises_train_only(tmp_path):
    bars = universe(5, n_stocks=6, n=400)
    ds = build(bars, windows=20, val_ratio=0.25, out_dir=tmp_path)
    counts = class_counts(ds['train'])
    assert len(set(counts.values())) == 1 and counts['up'] > 0
    assert ds['stats']['classes_after']['train'] == counts
    assert class_counts(ds['val']) == ds['stats']['classes_before']['val']
    natural = build(bars, windows=20, val_ratio=0.25, balance=False)
    assert class_counts(natural['train']) == ds['stats']['classes_before']['train']
    assert len(set(class_counts(natural['train']).values())) > 1  # the natural mix is not already balanced
    assert {r['id'] for r in ds['train']} <= {r['id'] for r in natural['train']}
    assert read_jsonl(tmp_path/'prompts_train.jsonl') == ds['train']
    assert read_jsonl(tmp_path/'prompts_val.jsonl') == ds['val']
    assert (tmp_path/'prompts_test.jsonl').read_text() == ''
    assert json.loads((tmp_path/'dataset_stats.json').read_text())['windows']['train'] == len(ds['train'])
    assert '股票 60000' in (tmp_path/'prompts_val.jsonl').read_text(encoding='utf-8')  # ensure_ascii=False


def test_short_stocks_are_skipped_and_reported():
    bars = {**universe(2, n_stocks=2), '000001': random_bars(12, 0)}
    ds = build(bars)
    assert '000001' in ds['stats']['skipped_stocks'] and ds['stats']['stocks'] == 2
    with pytest.raises(ValueError, match='no window of 10\\+3 days fits'): build({'000001': random_bars(12, 0)})


def test_bundled_universe_is_fast_and_sane():
    import time
    t0 = time.perf_counter()
    ds = build_dataset(windows=5, val_ratio=0.2, verbose=False)
    took = time.perf_counter() - t0
    assert ds['stats']['stocks'] == 40 and len(ds['val']) >= 30 and len(ds['train']) > 0
    print(f'build_dataset(all 40 bundled stocks, windows=5): {took:.2f}s, {ds["stats"]["windows"]}')

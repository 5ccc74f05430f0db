"Property and golden tests of stockdistill.dataset: exact prompts, no look-ahead, leak-free splits."
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stockdistill.config import ASSETS
from stockdistill.dataset import make_prompt, parse_prompt, window_change, format_change, PRICE_FIELDS

FIXTURES = Path(__file__).parent/'fixtures'
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_bars(n, seed, first='2020-01-02', gaps=True):
    "Random but valid daily bars: a log-normal walk on business days, with some days missing (suspensions)."
    rng = np.random.default_rng(seed)
    days = pd.bdate_range(first, periods=int(n*1.3) + 5)
    if gaps: days = days[np.sort(rng.choice(len(days), size=n, replace=False))]
    else: days = days[:n]
    close = np.round(np.maximum(0.5, 10*np.exp(np.cumsum(rng.normal(0, 0.02, n)))), 2)
    open_ = np.round(np.maximum(0.5, close*np.exp(rng.normal(0, 0.01, n))), 2)
    high = np.round(np.maximum(open_, close)*(1 + rng.uniform(0, 0.02, n)), 2)
    low = np.round(np.maximum(0.01, np.minimum(open_, close)*(1 - rng.uniform(0, 0.02, n))), 2)
    vol = rng.integers(1, 2_000_000, n).astype('int64')
    return pd.DataFrame({'date': days, 'open': open_, 'close': close, 'high': high, 'low': low, 'volume': vol})


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


def bundled(code):
    return pd.read_csv(ASSETS/'ashare'/f'{code}.csv.gz', parse_dates=['date'])


def test_golden_prompt():
    "The prompt for 600031's 30 days ending 2024-06-28 is exactly the checked-in one."
    bars = bundled('600031')
    window = bars[bars.date <= '2024-06-28'].tail(30)
    assert window.date.iloc[-1] == pd.Timestamp('2024-06-28')
    golden = (FIXTURES/'golden_prompt_600031_20240628.txt').read_text(encoding='utf-8')
    assert make_prompt('600031', window) == golden

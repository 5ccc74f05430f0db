"Tests of stockdistill.data: bundled bars, CSV folders, indicators, and the EastMoney client against a local server."
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stockdistill.config import bundled_codes
from stockdistill.data import (BAR_COLUMNS, FLOAT_COLUMNS, REQUIRED_COLUMNS, BUNDLED, add_indicators, bundled_stocks,
                               load_bars, stock_names)

FIXTURES = Path(__file__).parent/'fixtures'/'eastmoney'


# ---------------------------------------------------------------- bundled bars

def test_every_bundled_stock_loads_validated_with_documented_dtypes():
    info = bundled_stocks().set_index('code')
    bars, rep = load_bars(bundled_codes(), report=True)
    assert list(bars) == bundled_codes() and len(bars) == 40
    assert rep.dropped == 0
    for code, df in bars.items():
        assert list(df.columns) == BAR_COLUMNS
        assert str(df['date'].dtype) == 'datetime64[ns]'
        assert all(str(df[c].dtype) == 'float64' for c in FLOAT_COLUMNS)
        assert str(df['volume'].dtype) == 'int64'
        assert len(df) == info.loc[code, 'rows'], code
        assert df['date'].iloc[0] == pd.Timestamp(info.loc[code, 'first_date'])
        assert df['date'].iloc[-1] == pd.Timestamp(info.loc[code, 'last_date'])
        assert df['date'].is_monotonic_increasing and df['date'].is_unique
        assert (df['high'] >= df[['open', 'close']].max(axis=1)).all()
        assert (df['low'] <= df[['open', 'close']].min(axis=1)).all()
        assert np.isfinite(df[FLOAT_COLUMNS]).all().all() and (df['volume'] > 0).all()
    assert sum(len(df) for df in bars.values()) == 47055


def test_bundled_values_match_the_source_csv():
    raw = pd.read_csv(BUNDLED/'600031.csv.gz')
    bars = load_bars('600031')
    assert bars['date'].dt.strftime('%Y-%m-%d').tolist() == raw['date'].tolist()
    for c in BAR_COLUMNS[1:]: np.testing.assert_array_equal(bars[c].to_numpy(), raw[c].to_numpy())


def test_stock_names_and_date_range():
    assert stock_names()['688981'] == '中芯国际'
    bars = load_bars(['600031', '601872'], start='2024-12-18', end='2024-12-31')
    assert [len(b) for b in bars.values()] == [10, 10]


def test_unknown_code_and_bad_source_are_clear_errors():
    with pytest.raises(FileNotFoundError, match='000001 is not a bundled stock'): load_bars('000001')
    with pytest.raises(ValueError, match='not a six-digit'): load_bars('60003')
    with pytest.raises(ValueError, match='no/such/folder'): load_bars('600031', source='no/such/folder')


# ---------------------------------------------------------------- CSV folders

def _write(folder, code, df): df.to_csv(folder/f'{code}.csv', index=False)


def test_csv_folder_with_six_columns_derives_the_rest(tmp_path):
    ref = load_bars('600031', end='2020-03-31')
    _write(tmp_path, '600031', ref[REQUIRED_COLUMNS].assign(date=ref['date'].dt.strftime('%Y-%m-%d')))
    bars, rep = load_bars('600031', source=tmp_path, report=True)
    assert rep.dropped == 0 and len(bars) == len(ref)
    assert list(bars.columns) == BAR_COLUMNS and str(bars['volume'].dtype) == 'int64'
    # the first row has no previous close: its derived values are NaN, every later one is EastMoney's to 0.01
    assert bars.loc[0, ['pct_chg', 'change', 'amplitude']].isna().all()
    for c in ('pct_chg', 'amplitude'):
        assert np.abs(bars[c][1:] - ref[c][1:]).max() <= 0.0101, c
    np.testing.assert_allclose(bars['change'][1:], ref['change'][1:], atol=1e-9)
    assert bars[['amount', 'turnover']].isna().all().all()      # not derivable


def test_csv_folder_bad_rows_are_dropped_and_counted(tmp_path):
    ref = load_bars('000333', end='2020-01-31')[REQUIRED_COLUMNS].astype({'date': str}).astype(object)
    n = len(ref)
    bad = ref.copy()
    bad.loc[1, 'close'] = 'nan'            # non-finite
    bad.loc[2, 'open'] = '0'               # non-positive
    bad.loc[3, 'high'] = '1.0'             # high below the body
    bad.loc[4, 'low'] = '999'              # low above the body
    bad.loc[5, 'volume'] = '-5'            # non-positive volume
    bad.loc[6, 'close'] = 'inf'            # non-finite
    bad = pd.concat([bad, bad.iloc[[8]], ref.iloc[[1]]], ignore_index=True)   # a repeated day, a day out of order
    _write(tmp_path, '000333', bad)
    bars, rep = load_bars('000333', source=tmp_path, report=True)
    e = rep.entries[str(tmp_path/'000333.csv')]
    assert (e['read'], e['kept']) == (n + 2, n - 6)
    assert (e['non_finite'], e['non_positive'], e['high_below_body'], e['low_above_body']) == (2, 2, 1, 1)
    assert (e['duplicate_date'], e['unsorted_date']) == (1, 1)
    assert rep.dropped == 8 and 'dropped' in repr(rep)
    assert len(bars) == n - 6 and bars['date'].is_monotonic_increasing and bars['date'].is_unique


def test_csv_file_without_valid_rows_names_the_file(tmp_path):
    _write(tmp_path, '600031', pd.DataFrame({'date': ['2024-01-02'], 'open': [-1], 'close': [1], 'high': [1],
                                             'low': [1], 'volume': [1]}))
    with pytest.raises(ValueError, match=r'600031\.csv: no valid bar'): load_bars('600031', source=tmp_path)
    (tmp_path/'600031.csv').write_text('date,open,close\n2024-01-02,1,1\n')
    with pytest.raises(ValueError, match=r'600031\.csv: missing column\(s\) high, low, volume'):
        load_bars('600031', source=tmp_path)


# ---------------------------------------------------------------- indicators

def test_indicators_by_hand():
    closes = [10., 11, 12, 11, 13, 14, 13, 15, 16, 15, 17, 18, 17, 19, 20, 18, 19, 21, 22, 20, 23]
    bars = pd.DataFrame({'close': closes, 'volume': np.arange(1, len(closes) + 1) * 100})
    ind = add_indicators(bars)
    # moving averages: plain means of the last n
    assert np.isnan(ind['ma5'][3]) and ind['ma5'][4] == pytest.approx(11.4)
    assert ind['ma10'][9] == pytest.approx(sum(closes[:10]) / 10) and np.isnan(ind['ma10'][8])
    assert ind['ma20'][20] == pytest.approx(sum(closes[1:21]) / 20)
    assert ind['vol_ma5'][6] == pytest.approx((300 + 400 + 500 + 600 + 700) / 5)
    # MACD: EMAs seeded at the first close, alpha = 2/(n+1)
    e12, e26 = [10.], [10.]
    for c in closes[1:]: e12.append(e12[-1] + 2/13*(c - e12[-1])); e26.append(e26[-1] + 2/27*(c - e26[-1]))
    dif = np.array(e12) - np.array(e26)
    dea = [0.]
    for d in dif[1:]: dea.append(dea[-1] + 0.2*(d - dea[-1]))
    np.testing.assert_allclose(ind['dif'], dif, atol=1e-12)
    np.testing.assert_allclose(ind['dea'], dea, atol=1e-12)
    np.testing.assert_allclose(ind['macd'], 2*(dif - np.array(dea)), atol=1e-12)
    # RSI14, Wilder: seed = mean of the first 14 changes, then (13*avg + x)/14
    ch = np.diff(closes)
    g, l = ch[:14].clip(min=0).mean(), (-ch[:14]).clip(min=0).mean()
    assert ind['rsi14'][14] == pytest.approx(100*g/(g + l)) and ind['rsi14'][:14].isna().all()
    for i in range(15, len(closes)):
        g, l = (13*g + max(ch[i-1], 0))/14, (13*l + max(-ch[i-1], 0))/14
        assert ind['rsi14'][i] == pytest.approx(100*g/(g + l))


def test_indicators_keep_bars_and_add_columns():
    bars = load_bars('600031', start='2024-01-01')
    ind = add_indicators(bars)
    assert list(ind.columns) == BAR_COLUMNS + ['ma5', 'ma10', 'ma20', 'dif', 'dea', 'macd', 'rsi14', 'vol_ma5']
    pd.testing.assert_frame_equal(ind[BAR_COLUMNS], bars)
    assert ind['rsi14'].dropna().between(0, 100).all()

"Property tests of stockdistill.graph: no look-ahead (rewritten or removed futures), determinism, errors, regions, the token budget, one road with --context."
import argparse
import json
from pathlib import Path
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stockdistill.config import DistillConfig, add_config_args, bundled_codes, config_from_args, load_config
from stockdistill.data import bundled_stocks, load_bars
from stockdistill import graph
from stockdistill.graph import (REGION, EmptyNeighbourhood, GraphRuleTeacher, GraphSettings, GraphUnavailable, Market,
                                context_moves, context_tokenizer, correlations, graph_global, graph_local)
from stockdistill.prompt import count_tokens
from stockdistill.teacher import RuleTeacher, get_teacher, label_samples

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DATE = re.compile(r'\d{4}-\d{2}-\d{2}')


@pytest.fixture(scope='module')
def bars():
    return load_bars(bundled_codes())


@pytest.fixture(scope='module')
def market(bars):
    return Market(bars)


@pytest.fixture(scope='module')
def tok():
    "The embedded student's tokenizer: what a default run counts graph_max_tokens with."
    t = context_tokenizer(DistillConfig())
    assert t is not None
    return t


def searches(market, code, asof, s=None) -> dict:
    "Both searches' text, or the name of the error each raised."
    out = {}
    for name in ('local_search', 'global_search'):
        try: out[name] = getattr(market, name)(code, asof, s)
        except GraphUnavailable as e: out[name] = type(e).__name__
    return out


def rewrite_future(bars, asof, rng) -> dict:
    "Every bar after `asof` rewritten: prices scaled by up to 10x either way, some dropped, some new days added."
    out = {}
    for c, b in bars.items():
        fut = b[b.date > asof]
        fut = fut[rng.random(len(fut)) > 0.3].copy()
        k = np.exp(rng.uniform(-2.3, 2.3, len(fut)))
        for col in ('open', 'close', 'high', 'low'): fut[col] = fut[col]*k
        extra = fut.head(3).copy()
        extra['date'] = pd.Timestamp('2030-01-01') + pd.to_timedelta(np.arange(len(extra)), 'D')
        out[c] = pd.concat([b[b.date <= asof], fut, extra], ignore_index=True)
    return out


def window_of(market, i, day):
    "The stock and date a drawn window stands for: the i-th code, the day-th date of the calendar (clipped to its end)."
    return market.codes[i], market.calendar[min(day, len(market.calendar) - 1)]


windows = st.tuples(st.integers(0, 39), st.integers(20, 1200), st.integers(0, 10**6), st.sampled_from(['D', 'W', 'M']))


@FEW
@given(windows)
def test_rewritten_future_leaves_context_unchanged(bars, market, w):
    "For random windows, rewriting every bar after the window's end changes no character of either block."
    i, day, seed, rebuild = w
    code, asof = window_of(market, i, day)
    s = GraphSettings(graph_rebuild=rebuild)
    before = searches(market, code, asof, s)
    after = searches(Market(rewrite_future(bars, asof, np.random.default_rng(seed))), code, asof, s)
    assert after == before
    for text in before.values():
        for d in DATE.findall(text): assert pd.Timestamp(d) <= asof, (d, asof, text)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(windows)
def test_removed_future_leaves_context_unchanged(bars, market, w):
    "Cutting the data at the window's end (which shortens the calendar too) changes nothing either."
    i, day, _, rebuild = w
    code, asof = window_of(market, i, day)
    s = GraphSettings(graph_rebuild=rebuild)
    cut = {c: b[b.date <= asof] for c, b in bars.items() if (b.date <= asof).any()}
    if code not in cut: return
    assert searches(Market(cut), code, asof, s) == searches(market, code, asof, s)


@FEW
@given(st.integers(70, 1200), st.integers(0, 10**6))
def test_correlations_use_only_earlier_returns(bars, market, day, seed):
    "The graph's correlations equal a by-hand computation on returns up to the build date, and ignore later ones."
    date = market.calendar[day]
    C = correlations(market, date, 60)
    later = Market(rewrite_future(bars, date, np.random.default_rng(seed)))
    pd.testing.assert_frame_equal(correlations(later, date, 60), C)
    R = market.returns.loc[:date].tail(60)
    R = R.sub(R.mean(axis=1), axis=0)
    a, b = market.codes[seed % 40], market.codes[(seed // 40) % 40]
    both = R[[a, b]].dropna()
    if a != b and len(both) >= 30: np.testing.assert_allclose(C.loc[a, b], np.corrcoef(both[a], both[b])[0, 1], atol=1e-9)


@given(st.dates(pd.Timestamp('2020-01-01').date(), pd.Timestamp('2025-03-01').date()), st.sampled_from(['D', 'W', 'M']))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_build_date_is_before_the_period(market, day, rebuild):
    "A window reads a graph built strictly before its day/week/month began, and that graph is dated on or before it."
    asof = pd.Timestamp(day)
    d = market.build_date(asof, rebuild)
    if d is not None:
        assert d < asof.to_period(rebuild).start_time <= asof
        G = market.graph(asof, GraphSettings(graph_rebuild=rebuild))
        assert G.graph['date'] == d


def test_deterministic_in_other_processes(market):
    "The same window gives the same context in a fresh process with another string-hash seed (Louvain, sets, caches)."
    windows = [('688981', '2024-02-07'), ('600031', '2024-06-28'), ('300033', '2021-03-03'), ('000002', '2022-11-15')]
    here = [searches(market, c, d) for c, d in windows]
    code = ("import json,sys; from stockdistill.data import load_bars; from stockdistill.config import bundled_codes;"
            "from stockdistill.graph import Market, GraphUnavailable; m=Market(load_bars(bundled_codes())); out=[]\n"
            f"for c, d in {windows!r}:\n"
            "    r={}\n"
            "    for n in ('local_search','global_search'):\n"
            "        try: r[n]=getattr(m,n)(c,d)\n"
            "        except GraphUnavailable as e: r[n]=type(e).__name__\n"
            "    out.append(r)\n"
            "print(json.dumps(out, ensure_ascii=False))")
    for seed in ('1', '12345'):
        p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'PYTHONHASHSEED': seed})
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout) == here


def test_errors_are_clear(market):
    with pytest.raises(ValueError, match=r"stock '123456' is not in the graph's universe \(40 stocks"):
        market.local_search('123456', '2024-06-28')
    with pytest.raises(EmptyNeighbourhood, match='stock 600717 has no neighbour in the graph of 2024-06-21: no industry or region peer'):
        market.local_search('600717', '2024-06-28', GraphSettings(graph_min_corr=0.99))   # 天津港: alone in 港口 and in 天津
    with pytest.raises(GraphUnavailable, match='no graph before 2020-01-03'):
        market.global_search('600031', '2020-01-03')
    with pytest.raises(ValueError, match=r'graph_max_tokens=40 is too small: the graph-local block takes \d+ characters with a single item'):
        market.local_search('688981', '2024-02-07', GraphSettings(graph_max_tokens=40))
    with pytest.raises(ValueError, match='graph_max_tokens=10 must be at least 40'):
        GraphSettings(graph_max_tokens=10)
    with pytest.raises(ValueError, match=r'graph_max_chars=320 is retired: the context budget is graph_max_tokens \(--graph-max-tokens\)'):
        config_from_args(add_config_args(argparse.ArgumentParser()).parse_args(['--graph-max-chars', '320'])).contexts
    with pytest.raises(ValueError, match="graph_rebuild='X' must be one of D, W, M"):
        GraphSettings(graph_rebuild='X')
    with pytest.raises(ValueError, match="retrieval='yes' must be one of none, local, global, both"):
        DistillConfig().replace(retrieval='yes').contexts


def test_providers_say_nothing_where_the_graph_has_nothing():
    cfg = DistillConfig().replace(retrieval='both', graph_min_corr=0.99)
    assert graph_local('600717', pd.Timestamp('2024-06-28'), cfg) is None       # empty neighbourhood
    assert graph_local('600031', pd.Timestamp('2024-06-28'), cfg).endswith('。') # alone in its industry, not in 北京
    assert graph_global('600031', pd.Timestamp('2020-01-03'), cfg) is None      # before the first graph
    assert graph_global('600031', pd.Timestamp('2024-06-28'), cfg).startswith('【图谱检索·全局】截至2024-06-28')
    with pytest.raises(ValueError, match="stock '123456' is not in the graph's universe"):
        graph_local('123456', pd.Timestamp('2024-06-28'), cfg)


def test_budget_drops_lowest_ranked_items(market, tok):
    full = market.local_search('688981', '2024-02-07', GraphSettings(graph_peers=3), tok)
    assert '注册地同在上海的另4只' in full and count_tokens(full, tok) <= GraphSettings().graph_max_tokens
    for n in (count_tokens(full, tok) - 1, 150, 100):
        short = market.local_search('688981', '2024-02-07', GraphSettings(graph_peers=3, graph_max_tokens=n), tok)
        assert count_tokens(short, tok) <= n and short.endswith('。') and '注册地' not in short   # the region line goes first
        assert full.startswith(short[:-1])   # the full block cut between items


budgets = st.tuples(st.integers(0, 39), st.integers(60, 1200), st.integers(40, 420), st.sampled_from(['local_search', 'global_search']))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(budgets)
def test_block_fits_the_token_budget(market, tok, w):
    "Counted with the student's tokenizer, a block never takes more than graph_max_tokens, or the error says how many it needs."
    i, day, n, search = w
    code, asof = market.codes[i], market.calendar[day]
    try: full = getattr(market, search)(code, asof, GraphSettings(graph_max_tokens=10**6), tok)
    except GraphUnavailable: return
    try: text = getattr(market, search)(code, asof, GraphSettings(graph_max_tokens=n), tok)
    except ValueError as e:
        need = int(re.search(r'takes (\d+) tokens', str(e))[1])
        assert f'graph_max_tokens={n} is too small' in str(e) and need > n
        return
    assert count_tokens(text, tok) <= n
    assert text == full or full.startswith(text[:-1])          # the block cut between items, never mid-item
    if count_tokens(full, tok) <= n: assert text == full


def test_budget_counts_with_the_runs_tokenizer(market, tok, monkeypatch):
    "The providers count graph_max_tokens with the run's student tokenizer; characters only when the run has none."
    full = market.local_search('688981', '2024-02-07', tokenizer=tok)
    n = count_tokens(full, tok) - 1
    assert len(full) <= n   # so a character count would keep the whole block: the two units differ here
    cfg = DistillConfig().replace(retrieval='local', graph_max_tokens=n)
    text = graph_local('688981', pd.Timestamp('2024-02-07'), cfg)
    assert context_tokenizer(cfg) is tok and count_tokens(text, tok) <= n and text != full
    import stockdistill.generate
    monkeypatch.setattr(stockdistill.generate, 'EMBEDDED_STUDENT', Path('/nonexistent'))   # a tiny student with no pretrained model
    monkeypatch.setattr(graph, '_TOKENIZERS', {})
    assert context_tokenizer(cfg) is None
    assert graph_local('688981', pd.Timestamp('2024-02-07'), cfg) == full                  # n characters: all of it fits
    p = add_config_args(argparse.ArgumentParser())
    assert config_from_args(p.parse_args(['--graph-max-tokens', '200'])).settings(GraphSettings).graph_max_tokens == 200


def test_regions_when_stocks_csv_has_them(bars, market):
    "Region nodes and the region line come from stocks.csv's region column; a table without one keeps everything else."
    info = bundled_stocks()
    assert info.region.notna().all() and info.set_index('code').region['000895'] == '河南'
    G = market.graph('2024-06-28')
    assert {d['name'] for _, d in G.nodes(data=True) if d['kind'] == 'region'} == set(info.region)
    assert G.has_edge('000002', REGION + '广东') and G.edges['000002', REGION + '广东']['kind'] == 'region'
    bare = Market(bars, info=info.drop(columns='region'))
    assert bare.region == {} and not any(d['kind'] == 'region' for _, d in bare.graph('2024-06-28').nodes(data=True))
    for code, day in [('688981', '2024-02-07'), ('000002', '2022-11-15'), ('002202', '2021-03-03')]:
        with_region, without = market.local_search(code, day), bare.local_search(code, day)
        line = re.search(r'注册地同在(\S+?)的另\d+只[^。]*。', with_region)
        assert line and line[1] == market.region[code] and with_region.endswith(line[0])
        assert with_region.replace(line[0], '') == without and '注册地' not in without
        assert market.global_search(code, day) == bare.global_search(code, day)   # global search has no region part


@FEW
@given(windows)
def test_region_line_is_computed_from_earlier_bars_only(bars, market, w):
    "The region line's count, breadth and mean equal a by-hand computation on each peer's bars up to the window's end."
    i, day, _, _ = w
    code, asof = window_of(market, i, day)
    try: text = market.local_search(code, asof, GraphSettings(graph_max_tokens=10**6))
    except GraphUnavailable: return
    past = {c: b[b.date <= asof] for c, b in bars.items()}
    cal = sorted(set().union(*(set(b.date) for b in past.values())))
    start = cal[-6] if len(cal) > 5 else None
    moves = {}
    for c, b in past.items():
        if c == code or market.region.get(c) != market.region[code] or start is None: continue
        before = b[b.date <= start]
        if len(before) and (b.date > start).any(): moves[c] = (b.close.iloc[-1]/before.close.iloc[-1] - 1)*100
    line = re.search(r'注册地同在(\S+?)的另(\d+)只(?:（([^）]*)）([+-]\d+\.\d+)%|平均([+-]\d+\.\d+)%（(\d+)涨(\d+)跌）)。', text)
    if not moves: assert line is None; return
    assert line and line[1] == market.region[code] and int(line[2]) == len(moves)
    x = np.array(list(moves.values()))
    if len(moves) == 1: assert (line[3], line[4]) == (market.names[next(iter(moves))], f"{round(x[0], 2):+.2f}".replace('-0.00', '+0.00'))
    else:
        assert abs(float(line[5]) - x.mean()) <= 0.005 + 1e-9
        assert (int(line[6]), int(line[7])) == ((x.round(2) > 0).sum(), (x.round(2) < 0).sum())


def test_market_without_industries(bars):
    "A universe outside stocks.csv (a CSV folder's own stocks): codes as names, no industry line, peers only."
    info = pd.DataFrame({'code': ['600031'], 'name': ['三一重工'], 'industry': ['工程机械']})
    m = Market({c: bars[c] for c in bundled_codes()[:12]}, info=info)
    assert m.names['601138'] == '601138' and '601138' not in m.industry and m.region == {}
    text = m.local_search('601138', '2023-06-30', GraphSettings(graph_min_corr=-1.0))   # every stock gets its 3 peers
    assert '同行业' not in text and '注册地' not in text and '（行业未知，相关' in text


def test_retrieval_flag_and_context_are_one_road(tmp_path):
    p = add_config_args(argparse.ArgumentParser())
    cfg = config_from_args(p.parse_args(['--retrieval', 'both', '--graph-peers', '2']))
    assert cfg.contexts == ['graph-local', 'graph-global'] and cfg.settings(GraphSettings).graph_peers == 2
    assert config_from_args(p.parse_args(['--context', 'graph-global', '--retrieval', 'local'])).contexts == ['graph-global', 'graph-local']
    assert load_config(cfg.replace(runs_dir=str(tmp_path)).save()).contexts == cfg.contexts   # a run's config.json
    from stockdistill.dataset import build_dataset
    a = build_dataset(DistillConfig(codes=['688981', '600703'], windows=2, window=8, balance=False).replace(retrieval='both'), verbose=False)
    b = build_dataset(DistillConfig(codes=['688981', '600703'], windows=2, window=8, balance=False, context='graph-local,graph-global'), verbose=False)
    assert [r['id'] for r in a['train'] + a['val']] == [r['id'] for r in b['train'] + b['val']]
    assert a['stats']['context'] == ['graph-local', 'graph-global']
    # the label lines record each prompt's context, for the context-aware teacher too
    recs = a['train'] + a['val']
    lines = label_samples(recs, get_teacher('rule-graph', concurrency=4), tmp_path/'labels.jsonl', progress=False)
    assert {l['id']: l.get('context') for l in lines} == {r['id']: r.get('context') for r in recs}
    assert any(r.get('context') for r in recs)


def test_rule_graph_teacher(market):
    teacher, rule = GraphRuleTeacher(), RuleTeacher()
    from stockdistill.prompt import window_prompt
    b = load_bars('688981'); end = int(np.searchsorted(b.date, pd.Timestamp('2024-02-07')))
    bare = window_prompt('688981', b, end - 9, end)[0]
    assert teacher(bare) == rule(bare)                                  # no context: the rule teacher's answer
    hot = '【图谱检索·全局】截至2024-02-07近5日：样本40只，40涨0跌，平均+6.00%。\n' + bare
    cold = '【图谱检索·全局】截至2024-02-07近5日：样本40只，0涨40跌，平均-6.00%。\n' + bare
    step = {'down': -1, 'flat': 0, 'up': 1}
    assert step[teacher.direction(hot)] < step[teacher.direction(cold)]  # it leans against the neighbourhood's move
    assert context_moves(hot)['market'] == 6.0
    region = '【图谱检索·局部】截至2024-02-07近5日：注册地同在上海的另4只平均+6.00%（4涨0跌）。\n' + bare
    assert context_moves(region) == dict(industry=None, peers=None, community=None, market=None, region=6.0)
    assert teacher(region) == rule(region)                              # read back, but the tilt leaves region out
    both = hot.split('\n')[0] + '\n' + region
    assert context_moves(both)['region'] == 6.0 and teacher.judge(both) == teacher.judge(hot)   # the region move does not tilt
    from stockdistill.evaluate import answer_direction
    for p in (hot, cold, bare): assert answer_direction(teacher(p)['label']) == teacher.direction(p)
    assert teacher(hot) == teacher(hot)

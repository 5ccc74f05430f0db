"""The shipped embedded models (10_embedded) and the rule-teacher personas (03a_personas): they load with the plain
Auto classes, read the prompts the way they were trained to, answer in JSON before tuning, learn the `balanced`
judgement from a short LoRA tuning, and the personas keep their contracts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stockdistill.data import load_bars
from stockdistill.dataset import build_dataset
from stockdistill.prompt import make_prompt
from stockdistill.embedded import (EMBEDDED_BASE, EMBEDDED_TEACHER, VocabMismatchError, assert_disjoint, base_persona,
                                   check_same_vocab, corpus_record, folder_mb, predicted_directions, train_embedded_tokenizer,
                                   training_windows)
from stockdistill.evaluate import answer_direction, direction_of
from stockdistill.personas import PERSONAS, persona_answer, prompt_signals
from stockdistill.teacher import extract_json
from stockdistill.prompt import format_example

FIXTURES = Path(__file__).parent/'fixtures'


@pytest.fixture(scope='module')
def quickstart():
    "The quick start's dataset at a small --windows (its validation period does not depend on --windows)."
    return build_dataset(windows=8, verbose=False)


@pytest.fixture(scope='module')
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE, dtype=torch.float32), AutoTokenizer.from_pretrained(EMBEDDED_BASE)


# ---- the shipped folders ---------------------------------------------------------------------------------------

def test_shipped_models_load_with_auto_classes_in_float32(base, quickstart):
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(EMBEDDED_TEACHER, dtype=torch.float32)
    model, tok = base
    assert (model.dtype, teacher.dtype) == (torch.float32, torch.float32)
    assert model.config.model_type == teacher.config.model_type == 'qwen2'
    assert teacher.num_parameters() > 2*model.num_parameters()
    # the tokenizer as saved (transformers 5 would otherwise rebuild Qwen2's pre-tokenizer: ~2,300 tokens a prompt)
    n = len(tok(format_example(quickstart['val'][0]['prompt']))['input_ids'])
    assert 550 < n < 700, n
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_package_stays_small():
    assert folder_mb(EMBEDDED_BASE) < 16 and folder_mb(EMBEDDED_TEACHER) < 40
    assert folder_mb(EMBEDDED_BASE.parent.parent) < 100      # the whole package, bars included


def test_base_answers_in_json_before_tuning(base, quickstart):
    from stockdistill.generate import generate_answers
    answers = generate_answers(*base, [r['prompt'] for r in quickstart['val'][:3]], batch_size=3, max_new_tokens=160)
    for a in answers:
        obj = extract_json(a)
        assert obj is not None and set(obj) == {'prediction', 'analysis', 'advice'}, a
        assert direction_of(obj['prediction']) in ('up', 'down', 'flat')


def test_teacher_shares_the_students_vocabulary(base):
    from transformers import AutoTokenizer
    assert check_same_vocab(base[1], AutoTokenizer.from_pretrained(EMBEDDED_TEACHER))
    other = train_embedded_tokenizer(['股票 600031 近3日K线数据: 涨跌幅: +1.00%。'] * 4, vocab_size=400)
    with pytest.raises(VocabMismatchError, match=f"student vocabulary has {len(base[1]):,} tokens, teacher vocabulary {len(other):,}"):
        check_same_vocab(base[1], other)


def test_short_lora_tuning_moves_direction_agreement(base, quickstart, tmp_path):
    "96 LoRA steps of 4 windows on `balanced` labels raise agreement on held-back validation windows well above the base's."
    from stockdistill.config import DistillConfig
    from stockdistill.dataset import write_jsonl
    from stockdistill.generate import load_student
    from stockdistill.train import train_student
    ds = build_dataset(windows=12, verbose=False)
    train = [dict(id=r['id'], prompt=r['prompt'], label=persona_answer('balanced', r['prompt'])['label']) for r in ds['train']]
    held = quickstart['val']      # all 68 validation windows of --windows 8
    want = [PERSONAS['balanced'].direction(prompt_signals(r['prompt'])) for r in held]
    agree = lambda m, t: np.mean([a == b for a, b in zip(predicted_directions(m, t, [r['prompt'] for r in held], batch_size=68), want)])
    before = agree(*base)
    write_jsonl(tmp_path/'train.jsonl', [dict(r, label=json.dumps(r['label'], ensure_ascii=False)) for r in train])
    cfg = DistillConfig(run_name='lora', runs_dir=str(tmp_path), student=str(EMBEDDED_BASE), lora_r=32, lora_alpha=64,
                        lora_dropout=0.0, lr=3e-3, batch_size=4, grad_accum=1, max_steps=TUNE_STEPS, overwrite=True)
    train_student(cfg, train_path=tmp_path/'train.jsonl', preset=False)
    after = agree(*load_student(adapter=cfg.path('lora_adapter'), merge=True))
    assert after >= before + 0.1, (before, after)


TUNE_STEPS = 96   # of 4 windows. Rebuilt base, this 2-core machine, the 68 held windows: 0.662 -> 0.809 (64 steps: 0.779;
                  # on their first 48 alone, 0.708 -> 0.792 after 64 steps: too few windows for a 0.1 margin)


# ---- the corpus ------------------------------------------------------------------------------------------------

def test_corpus_holds_training_period_windows_only(quickstart):
    wins, bars = training_windows(codes=['600031', '688981'])
    val_start = quickstart['stats']['periods']['val'][0]
    records = [corpus_record(c, bars[c], s, e) for c, s, e in wins[::40]]
    assert max(r['end'] for r in records) < val_start
    assert {r['persona'] for r in records} <= {'trend', 'reversion', 'volume'}
    assert_disjoint(records, quickstart['val'], val_start)
    with pytest.raises(AssertionError, match='held-out prompt'):
        assert_disjoint(records + [dict(prompt=quickstart['val'][0]['prompt'], end='2020-01-01')], quickstart['val'], val_start)
    assert base_persona(records[0]['prompt']) == records[0]['persona']


# ---- personas --------------------------------------------------------------------------------------------------

def test_balanced_is_byte_identical_to_the_recorded_rule_teacher():
    "Labels and reasoning recorded from the rule teacher of 03_teacher before it was built on personas."
    bars = {}
    for line in open(FIXTURES/'balanced_golden.jsonl', encoding='utf-8'):
        g = json.loads(line)
        b = bars.setdefault(g['code'], load_bars(g['code']))
        w = b[(b['date'] >= g['start']) & (b['date'] <= g['end'])]
        assert len(w) == 30
        res = persona_answer('balanced', make_prompt(g['code'], w))
        assert json.dumps(res['label'], ensure_ascii=False) == json.dumps(g['label'], ensure_ascii=False)
        assert res['reasoning'] == g['reasoning']


def test_personas_are_deterministic_and_never_state_a_missing_indicator():
    rng = np.random.default_rng(1)
    reveals = {'ma20': ['MA20'], 'rsi': ['RSI'], 'dif': ['MACD', 'DIF', 'DEA', '金叉', '死叉'], 'vol_ratio': ['量能平稳', '均量']}
    for code in ('600031', '300014', '688981'):
        b = load_bars(code)
        for n in (3, 8, 12, 16, 22, 27, 30):
            st = int(rng.integers(0, len(b) - n))
            prompt = make_prompt(code, b.iloc[st:st + n])
            s = prompt_signals(prompt)
            s = {**s, 'ma20': s['ma'][20]}
            for name in PERSONAS:
                res = persona_answer(name, prompt)
                assert res == persona_answer(name, prompt)
                assert answer_direction(res['label']) == PERSONAS[name].direction(prompt_signals(prompt))
                text = ''.join(res['label'].values()) + res['reasoning']
                for ind, words in reveals.items():
                    if s[ind] is None: assert not any(w in text for w in words), (name, n, ind, text)

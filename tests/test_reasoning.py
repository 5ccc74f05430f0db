"""Reasoning-trace distillation: the collator's labels, labels without reasoning, s1 budget forcing and extension,
metrics without the thinking block, bad budgets, the warning for a student that never learned to think, and the
reasoning shapes of API teachers against the local chat server."""
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer, label_for  # noqa: E402
from stockdistill import reasoning  # noqa: E402
from stockdistill.config import DistillConfig  # noqa: E402
from stockdistill.evaluate import score_answers  # noqa: E402
from stockdistill.generate import answer_fn, generate_answers  # noqa: E402
from stockdistill.prompt import ANSWER_MARK  # noqa: E402
from stockdistill.reasoning import (THINK_CLOSE, THINK_OPEN, WAIT_WORD, ReasoningCollator, ThinkingTeacher,  # noqa: E402
                                    generate_thinking, reasoning_answer_fn, train_reasoning)
from stockdistill.teacher import OpenAITeacher, label_samples, read_labels  # noqa: E402
from stockdistill.train import train_tiny_tokenizer  # noqa: E402

PROMPT = '股票 600031 近3日K线数据: [ {"date": "2024-03-01", "close": 16.2} ]\n涨跌幅: +1.25%。请预测后市走势。'
LABEL = json.dumps({'prediction': '震荡上行', 'analysis': '均线多头排列', 'advice': '持股观望'}, ensure_ascii=False)
REASONING = '涨跌幅+1.25%，区间位置60%；打分：涨跌幅+0.31，均线+0.50；合计+0.81，中性。'


@pytest.fixture(scope='module')
def tok():
    texts = [PROMPT, LABEL, REASONING, reasoning.thinking_target(REASONING, LABEL), 'xxxx 等等 {"prediction": "up"}'] * 4
    return train_tiny_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope='module')
def model(tok):
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id))
    return m.eval()


class Thinker(LogitsProcessor):
    "Makes any model write x `n` times per stretch of thinking, then `</think>`; after the answer marker, `answer`."
    def __init__(self, tok, n=3, answer='{"prediction": "up"}'): self.tok, self.n, self.answer = tok, n, answer

    def rest(self, text):
        if ANSWER_MARK in text: return self.answer[len(text.rsplit(ANSWER_MARK, 1)[1]):]
        stretch = text.rsplit(THINK_OPEN, 1)[1].rsplit(WAIT_WORD, 1)[-1]
        if stretch.count('x') < self.n: return 'x'
        return THINK_CLOSE[next((k for k in range(len(THINK_CLOSE), 0, -1) if stretch.endswith(THINK_CLOSE[:k])), 0):]

    def __call__(self, input_ids, scores):
        for r, row in enumerate(input_ids.tolist()):
            rest = self.rest(self.tok.decode(row, skip_special_tokens=True))
            want = self.tok(rest, add_special_tokens=False)['input_ids'][0] if rest else self.tok.eos_token_id
            scores[r] = -float('inf')
            scores[r, want] = 0
        return scores


# ---- training text and labels ----------------------------------------------------------------------------------

def test_collator_labels_cover_reasoning_and_answer_exactly(tok):
    ex = dict(id='a', prompt=PROMPT, label=LABEL, reasoning=REASONING)
    read = tok(f'{PROMPT}\n\n<think>', add_special_tokens=False)['input_ids']
    write = tok(f'{REASONING}</think>\n### 答案：{LABEL}', add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
    for pack in (False, True):
        batch = ReasoningCollator(tok, pack=pack)([ex])
        assert batch['input_ids'][0].tolist() == read + write
        assert batch['labels'][0].tolist() == [-100] * len(read) + write
    assert tok.decode(write) == f'{REASONING}</think>\n### 答案：{LABEL}{tok.eos_token}'


def test_a_label_without_reasoning_trains_answer_only_or_is_dropped(tok, tmp_path, monkeypatch):
    for missing in (None, '', '   '):
        labels = ReasoningCollator(tok).encode(dict(prompt=PROMPT, label=LABEL, reasoning=missing))[1]
        assert tok.decode([t for t in labels if t != -100]) == f'</think>\n### 答案：{LABEL}{tok.eos_token}'
    recs = [dict(id=str(i), prompt=PROMPT, label=LABEL, reasoning=REASONING if i % 3 else None) for i in range(9)]
    path = tmp_path/'cleaned_labeled_data.jsonl'
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
    seen = {}
    def fake_train(cfg, train_path, val_path, resume, collator, columns, extra_summary):
        seen.update(ids=[json.loads(line)['id'] for line in open(train_path, encoding='utf-8')], collator=collator,
                    columns=columns)
        return {'method': cfg.method, **extra_summary(None)}
    monkeypatch.setattr(reasoning, 'train_student', fake_train)
    cfg = DistillConfig(runs_dir=str(tmp_path), method='sft-reasoning')
    kept = train_reasoning(cfg, path)
    assert len(seen['ids']) == 9 and seen['collator'] is ReasoningCollator and seen['columns'] == ('reasoning',)
    assert (kept['train_with_reasoning'], kept['train_without_reasoning'], kept['train_dropped']) == (6, 3, 0)
    dropped = train_reasoning(cfg.replace(reasoning_missing='drop'), path)
    assert seen['ids'] == [r['id'] for r in recs if r['reasoning']] and dropped['train_dropped'] == 3
    none = tmp_path/'none.jsonl'
    none.write_text(json.dumps(dict(id='n', prompt=PROMPT, label=LABEL)) + '\n', encoding='utf-8')
    with pytest.warns(UserWarning, match='has reasoning'): train_reasoning(cfg, none)
    with pytest.raises(ValueError, match='drop leaves nothing to train on'): train_reasoning(cfg.replace(reasoning_missing='drop'), none)


# ---- budget forcing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('budget', [0, 1, 7])
def test_budget_cuts_thinking_at_n_tokens_and_the_answer_follows(tok, model, budget):
    prompts = [PROMPT, PROMPT.replace('600031', '000333'), '短']
    stats = {}
    out = generate_thinking(model, tok, prompts, batch_size=2, max_new_tokens=24, think_budget=budget, stats=stats,
                            logits_processor=[Thinker(tok, n=10_000)])   # a thinker that would never stop
    assert out == [f'<think>{"x" * budget}</think>\n{{"prediction": "up"}}'] * 3
    assert [u['reasoning_tokens'] for u in stats['usage']] == [budget] * 3
    assert all(u['completion_tokens'] > budget for u in stats['usage'])
    assert stats['think_budget'] == budget and stats['capped'] == 0


def test_a_random_model_is_cut_at_the_budget_too(tok, model):
    stats = {}
    out = generate_thinking(model, tok, [PROMPT] * 2, max_new_tokens=5, think_budget=6, stats=stats)
    assert all(u['reasoning_tokens'] <= 6 for u in stats['usage'])
    assert all(o.startswith('<think>') and '</think>\n' in o for o in out)


@pytest.mark.parametrize('k', [0, 1, 3])
def test_think_extend_inserts_the_wait_word_k_times(tok, model, k):
    stats = {}
    out = generate_thinking(model, tok, [PROMPT, '短'], max_new_tokens=24, think_extend=k, stats=stats,
                            logits_processor=[Thinker(tok, n=2)])
    thinking = out[0].split(THINK_CLOSE)[0]
    assert thinking == THINK_OPEN + WAIT_WORD.join(['xx'] * (k + 1)) and out[0] == out[1]
    assert thinking.count(WAIT_WORD) == k and [u['extended'] for u in stats['usage']] == [k, k]
    assert out[0].endswith('</think>\n{"prediction": "up"}')


def test_the_budget_bounds_extended_thinking(tok, model):
    stats = {}
    out = generate_thinking(model, tok, [PROMPT], max_new_tokens=24, think_budget=5, think_extend=5, stats=stats,
                            logits_processor=[Thinker(tok, n=2)])
    assert stats['usage'][0]['reasoning_tokens'] <= 5 and out[0].endswith('</think>\n{"prediction": "up"}')


# ---- evaluation, settings, warnings ----------------------------------------------------------------------------

def test_metrics_ignore_the_thinking_block():
    recs = [dict(prompt='涨跌幅: +5.00%。', label=LABEL, outcome={'direction': 'up'}),
            dict(prompt='涨跌幅: -4.00%。', label=LABEL, outcome={'direction': 'down'})]
    plain = [LABEL, '我认为会下跌']
    thought = [f'<think>{REASONING}看跌。</think>\n{LABEL}', '<think>看涨，看涨，看涨</think>\n我认为会下跌']
    assert score_answers(thought, recs, embed_model=False) == score_answers(plain, recs, embed_model=False)
    assert score_answers(thought, recs, embed_model=False)['directions'] == {'up': 1, 'down': 1}


def test_a_negative_budget_is_refused(tok, model, capsys):
    with pytest.raises(ValueError, match='think_budget=-1 must be >= 0'): DistillConfig().replace(think_budget=-1)
    with pytest.raises(ValueError, match='think_budget=-3'): generate_thinking(model, tok, [PROMPT], think_budget=-3)
    with pytest.raises(ValueError, match='think_extend=-1'): DistillConfig().replace(think_extend=-1)
    from stockdistill.cli import main
    with pytest.raises(SystemExit) as e: main(['ask', '请问股票600031未来走势如何？', '--think-budget', '-2', '--no-teacher'])
    assert e.value.code == 2 and 'think_budget=-2 must be >= 0' in capsys.readouterr().err


def test_a_budget_without_a_reasoning_adapter_warns_once_and_still_works(tok, model, tmp_path):
    adapter = tmp_path/'plain_adapter'
    adapter.mkdir()
    (adapter/'train_summary.json').write_text(json.dumps({'method': 'sft'}))
    cfg = DistillConfig().replace(think_budget=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fns = [reasoning_answer_fn(cfg, adapter) for _ in range(3)]
    assert sum('never learned to think' in str(w.message) for w in caught) == 1
    out = fns[0](model, tok, [PROMPT], max_new_tokens=4)
    assert out[0].startswith('<think>') and '</think>' in out[0]
    assert answer_fn(DistillConfig(), adapter) is generate_answers                    # nothing asked: plain answers
    (adapter/'train_summary.json').write_text(json.dumps({'method': 'sft-reasoning'}))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fn = answer_fn(DistillConfig(), adapter)                                       # a reasoning student thinks
    assert fn.func is generate_thinking and fn.keywords == dict(think_budget=None, think_extend=0)


# ---- teachers that reason --------------------------------------------------------------------------------------

def test_every_reasoning_shape_ends_in_the_label_line(tmp_path):
    modes = ['reasoning', 'think', 'reasoningfield', 'lonethink', 'qwenthink']
    prompts = [f'股票 00000{i} 的提问 [mode:{m}]' for i, m in enumerate(modes)]
    with ChatServer() as srv:
        kw = dict(model='r1-test', timeout=5, max_retries=0, concurrency=2)
        plain = {r['prompt']: r for r in label_samples(prompts, OpenAITeacher(srv.base_url, **kw), tmp_path/'a.jsonl', progress=False)}
        thinking = ThinkingTeacher(srv.base_url, **kw)
        streamed = label_samples(prompts[-1:], thinking, tmp_path/'q.jsonl', progress=False)[0]
        asked_plainly = OpenAITeacher(srv.base_url, extra_body={'enable_thinking': True}, **kw)(prompts[-1])
        calls = [c for c in srv.calls if 'qwenthink' in c['prompt']]
    for m, p in zip(modes[:-1], prompts):
        assert plain[p]['label'] == label_for(p) and plain[p]['reasoning'], m
    assert plain[prompts[-1]]['reasoning'] is None                  # Qwen3 without enable_thinking does not think
    assert streamed['label'] == label_for(prompts[-1]) and streamed['teacher'] == 'qwen-think'
    assert streamed['reasoning'] == '近30日先跌后涨，MACD金叉，判断震荡上行。'
    assert streamed['usage']['completion_tokens'] > 0 and thinking.usage_total['total_tokens'] > 0
    assert asked_plainly['error'].startswith('final: HTTP 400') and 'non-streaming' in asked_plainly['error']
    assert [c['status'] for c in calls] == [200, 200, 400]
    assert read_labels(tmp_path/'q.jsonl')[0]['reasoning'] == streamed['reasoning']

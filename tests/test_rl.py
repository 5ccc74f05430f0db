"""RL on prediction correctness (05e_rl): each reward on hand-built answers, no validation/test outcome reachable from the
reward, the KL term zero when the policy is the reference, zero-sum group advantages, the loss's gradient, and a GRPO run
end to end on a toy student (its adapter changes, the frozen reference does not)."""
import gc
import json
import pickle

import pytest
import torch
from stockdistill.config import DistillConfig
from stockdistill.rl import (RewardFunction, TrainingOutcomes, correctness_reward, format_reward, group_advantages, grpo_loss,
                             k3_kl, language_metrics, language_reward, outcome_tag, outcome_tag_collator, policy_and_reference,
                             reference_adapter, rl_settings, sample_groups, token_logprobs, train_grpo, word_direction)

GOOD = json.dumps(dict(prediction='预计短期下跌', analysis='近30日跌幅-6.10%，收盘价跌破MA10，量能萎缩，短线偏弱。',
                       advice='减仓观望，控制风险'), ensure_ascii=False)
LOOP = json.dumps(dict(prediction='下跌', analysis='下跌' * 30, advice='下跌'), ensure_ascii=False)


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A real small run (two stocks, train/val/test by time, rule labels) and a random toy student with a non-zero 'SFT' adapter."
    from stockdistill.dataset import build_dataset
    from stockdistill.distill import clean_step, label_step
    from stockdistill.generate import load_base
    from stockdistill.teacher import RuleTeacher
    from stockdistill.train import add_lora, build_tiny_student
    d = tmp_path_factory.mktemp('rl')
    cfg = DistillConfig(run_name='toy', runs_dir=str(d), codes=['600031', '000333'], windows=6, max_tokens=400, val_ratio=0.25,
                        test_ratio=0.25, student=str(d/'student'))
    ds = build_dataset(cfg, write=True)
    cleaned = clean_step(cfg, label_step(cfg, ds, [RuleTeacher()]))['rule']
    recs = [json.loads(line) for line in open(cleaned['train']['path'], encoding='utf-8')]
    build_tiny_student([r['prompt'] for r in recs] + [r['label'] for r in recs], d/'student', vocab_size=400, hidden_size=32,
                       layers=1, heads=2, kv_heads=1, intermediate_size=64, max_position_embeddings=1024)
    sft = add_lora(load_base(str(d/'student')), r=4, alpha=8, dropout=0.0, gradient_checkpointing=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.05)
    sft.save_pretrained(d/'sft')
    return dict(dir=d, cfg=cfg, ds=ds, cleaned=cleaned, recs=recs)


def test_format_reward_on_hand_built_answers():
    assert format_reward(GOOD) == 1.0
    assert format_reward('{"prediction": "上涨", "analysis": "", "advice": "持有"}') == pytest.approx(2/3)
    assert format_reward('```json\n' + GOOD + '\n```') == 1.0           # fenced JSON counts, as the evaluation's json_valid
    assert [format_reward(a) for a in ('预计下跌', '{"prediction": ', '', '[1, 2]')] == [0.0, 0.0, 0.0, 0.0]


def test_correctness_reward_on_hand_built_answers():
    down, up, flat = (dict(direction=d, forward_return=f) for d, f in (('down', -3.0), ('up', 2.5), ('flat', 0.3)))
    assert [correctness_reward(GOOD, o) for o in (down, up, flat)] == [1.0, 0.0, 0.0]
    hedge = json.dumps(dict(prediction='不会继续下跌，预计震荡', analysis='x', advice='y'), ensure_ascii=False)
    assert correctness_reward(hedge, flat) == 1.0                        # the evaluation's negation rule: flat
    assert ([word_direction(a) for a in ('涨', ' 跌。', '后市看涨', '{"prediction": "预计下跌，不会上涨"}', '横盘', '')]
            == ['up', 'down', 'up', 'down', 'unknown', 'unknown'])
    assert [correctness_reward(w, o, 'word') for w, o in (('涨', up), ('跌', down), ('涨', flat), ('跌', flat))] == [1, 1, 1, 0]


def test_language_reward_and_metrics_on_hand_built_answers():
    g, loop, word = language_reward(GOOD, 20, 400), language_reward(LOOP, 20, 400), language_reward('跌', 20, 400)
    assert (g['cjk'], g['distinct'], g['length']) == (1.0, 1.0, 1.0)
    assert loop['distinct'] < 0.1 and loop['language'] < g['language']
    assert word['distinct'] == 0.0 and word['length'] == pytest.approx(1/20)
    assert language_reward('abc def ghi ' * 10, 20, 400)['cjk'] == 0.0
    assert language_reward('跌' * 1000, 20, 400)['length'] == 0.0
    m = language_metrics([GOOD, LOOP, '跌'])
    assert m['loops'] == pytest.approx(1/3) and m['repetition'] > 0.3
    assert language_metrics([GOOD, GOOD])['distinct_2'] == pytest.approx(0.5)


def test_no_validation_or_test_outcome_is_reachable_from_the_reward(run):
    ds = run['ds']
    everything = ds['val'] + ds['train'] + ds['test']
    reward = RewardFunction(TrainingOutcomes(everything))
    assert len(reward.outcomes) == len(ds['train']) and ds['val'] and ds['test']
    for r in ds['val'] + ds['test']:
        with pytest.raises(KeyError, match='not a training window'): reward([GOOD], [r['id']])
    blob = pickle.dumps(reward)                                         # everything the reward holds, serialised
    assert not [r['id'] for r in ds['val'] + ds['test'] if r['id'].encode() in blob]
    seen, todo = set(), [reward]                                        # and everything reachable from it in memory
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type): continue
        seen.add(id(o))
        assert not (isinstance(o, dict) and o.get('split') in ('val', 'test')), 'a validation/test record is reachable'
        assert not (isinstance(o, str) and o in {r['id'] for r in ds['val'] + ds['test']}), 'a validation/test id is reachable'
        todo += [x for x in gc.get_referents(o) if not callable(x) or isinstance(x, (dict, list, tuple))]
    with pytest.raises(ValueError, match="no 'split'"):
        TrainingOutcomes([{k: v for k, v in ds['val'][0].items() if k != 'split'}])
    with pytest.raises(TypeError): RewardFunction({r['id']: r['outcome'] for r in everything})


def test_group_advantages_sum_to_zero():
    torch.manual_seed(1)
    for G in (2, 4, 8):
        r = torch.rand(5*G)*3
        a = group_advantages(r, G)
        assert torch.allclose(a.view(5, G).sum(1), torch.zeros(5), atol=1e-5)
        assert torch.allclose(a.view(5, G).std(1), torch.ones(5), atol=1e-3)   # scaled by the group's std
    assert group_advantages(torch.ones(8), 4).abs().max() == 0              # all equal: no signal
    with pytest.raises(ValueError, match='groups of 3'): group_advantages(torch.ones(8), 3)


def test_kl_is_zero_when_policy_equals_reference_and_loss_gradient():
    torch.manual_seed(2)
    lp = torch.log_softmax(torch.randn(4, 6, 9), -1)[..., 0]
    assert k3_kl(lp, lp).abs().max() == 0
    assert (k3_kl(lp, lp + torch.randn_like(lp)) >= 0).all()
    mask, adv = (torch.rand(4, 6) > 0.3).long(), torch.tensor([1.0, -1.0, 0.5, -0.5])
    p = lp.clone().requires_grad_(True)
    loss, st = grpo_loss(p, lp, adv, mask, lp, beta=0.5)
    assert st['kl'] == 0 and loss.item() == pytest.approx(-(adv[:, None]*mask).sum().item()/mask.sum().item(), abs=1e-6)
    loss.backward()                                                         # the KL's gradient is zero at π = π_ref
    assert torch.allclose(p.grad, -(adv[:, None]*mask)/mask.sum(), atol=1e-6)
    _, st = grpo_loss(lp, lp, adv, mask, lp - 0.5, beta=0.5)
    assert st['kl'] == pytest.approx(float(torch.exp(torch.tensor(-0.5)) + 0.5 - 1), rel=1e-5)


def test_reference_adapter_is_the_sft_model_and_stays_frozen(run):
    from stockdistill.generate import load_base
    from transformers import AutoTokenizer
    d = run['dir']
    tok = AutoTokenizer.from_pretrained(d/'student')
    policy = policy_and_reference(load_base(str(d/'student')), d/'sft')
    torch.manual_seed(0)
    roll = sample_groups(policy, tok, [r['prompt'] for r in run['recs'][:2]], group_size=2, max_new_tokens=6)
    with reference_adapter(policy), torch.no_grad(): ref = token_logprobs(policy, roll)
    assert k3_kl(token_logprobs(policy, roll).detach(), ref).abs().max() < 1e-6   # π = π_ref before any update: KL zero
    with policy.disable_adapter(), torch.no_grad(): base = token_logprobs(policy, roll)
    assert (base - ref).abs().max() > 1e-3                                        # the untuned base is not the reference
    assert all('.default.' in n for n, p in policy.named_parameters() if p.requires_grad)


def test_grpo_end_to_end_moves_the_policy_not_the_reference(run):
    from safetensors.torch import load_file
    d, cfg = run['dir'], run['cfg']
    g = cfg.replace(method='grpo', lr=5e-3, out='grpo', options=dict(rl_init_adapter=str(d/'sft'), grpo_steps=2, grpo_prompts=2,
                                                                   grpo_group_size=2, grpo_max_new_tokens=8, kl_beta=0.1))
    s = train_grpo(g, run['cleaned']['train']['path'])
    assert s['steps'] == 2 and s['reward_outcomes'] == dict(split='train', windows=len(run['ds']['train']),
                                                            other_splits_skipped={})
    assert {'reward_format', 'reward_correct', 'reward_language', 'kl', 'clip_ratio'} <= set(s['log'][0])
    before, after = load_file(str(d/'sft'/'adapter_model.safetensors')), load_file(str(g.adapter_dir/'adapter_model.safetensors'))
    assert before.keys() == after.keys()                                  # saved as a plain adapter ('default' only)
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0
    with pytest.raises(ValueError, match='not training windows'):         # a training file holding a validation window
        bad = d/'bad.jsonl'
        bad.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in run['recs'][:2] + run['ds']['val'][:1]), encoding='utf-8')
        train_grpo(g, bad)
    with pytest.raises(ValueError, match='--rl-init-adapter'): train_grpo(g.replace(options=dict(grpo_steps=1)))
    with pytest.raises(ValueError, match='--grpo-loss-type'): rl_settings(g.replace(options=dict(grpo_loss_type='ppo')))


def test_outcome_tags_come_from_training_outcomes_only(run):
    from transformers import AutoTokenizer
    ds, recs = run['ds'], run['recs']
    outcomes = TrainingOutcomes(ds['train'] + ds['val'])
    coll = outcome_tag_collator(outcomes, '预测正确')(AutoTokenizer.from_pretrained(run['dir']/'student'))
    r = recs[0]
    want = outcome_tag(r['label'], outcomes(r['id']))
    assert coll.texts(r)[0].endswith(f'事后标注：{want}\n\n### 答案：')
    val = dict(ds['val'][0], label=GOOD)
    for realized in ('up', 'down', 'flat'):                              # a validation window's tag never depends on its outcome
        v = dict(val, outcome=dict(direction=realized, forward_return=0.0))
        assert coll.texts(v)[0].endswith('事后标注：预测正确\n\n### 答案：')


def test_searcher_actions_gains_and_training(run):
    from stockdistill.rl import SEARCH_ACTIONS, search_gains, searcher_choices, subset_prompt, train_searcher
    r = dict(run['ds']['train'][0])
    local, glob = '【图谱检索·局部】截至2020-02-20近5日：同行业证券另1只（中国银河）+11.68%。', '【图谱检索·全局】截至2020-02-20近5日：样本34只，30涨4跌，平均+6.14%。'
    r.update(prompt=f"{local}\n{glob}\n{r['prompt']}", context=[local, glob])
    assert [subset_prompt(r, a).count('【图谱检索') for a in SEARCH_ACTIONS] == [0, 1, 1, 2]
    assert subset_prompt(r, 'global').startswith(glob) and subset_prompt(r, 'both') == r['prompt']
    with pytest.raises(ValueError, match='search action'): subset_prompt(r, 'all')
    ds = run['ds']
    outcomes = TrainingOutcomes(ds['train'] + ds['val'])
    y = outcomes(r['id'])['direction']
    other = next(d for d in ('up', 'down', 'flat') if d != y)
    dirs = [dict(none=y, local=other, both=other, **{'global': y})]
    assert search_gains([r], dirs, outcomes).tolist() == [[1.0, 0.0, 1.0, 0.0]]   # correct(a) − correct(both)
    with pytest.raises(KeyError, match='not a training window'): search_gains(ds['val'][:1], dirs, outcomes)
    X = torch.tensor([[1.0, 1.0], [1.0, -1.0]]).repeat(100, 1)
    gains = torch.zeros(200, 4); gains[0::2, 2] = 1.0; gains[1::2, 3] = 1.0      # 'global' pays on +1, 'both' on -1
    policy, log = train_searcher(X, gains, steps=100)
    assert searcher_choices(policy, X[:2]) == ['global', 'both'] and log[-1]['reward'] > log[0]['reward']

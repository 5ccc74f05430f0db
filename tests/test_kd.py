"""Logit/hidden/on-policy distillation (05c_kd): the KD loss by hand, α=0 is SFT, stored top-k round trips (in process and
from a logprobs server), GKD with λ=0 trains on teacher text only, the calibration maths, and the vocabulary-mismatch error."""
import json
import sys
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stockdistill.config import DistillConfig
from stockdistill.embedded import VocabMismatchError
from stockdistill.kd import (HiddenProjector, KDCollator, align_answer, brier, calibrate, direction_logprobs, ece,
                             fit_temperature, kd_collator, kd_loss, kd_settings, layer_map, load_kd_teacher, load_topk, nll,
                             prediction_phrases, save_topk, scale_probs, server_topk, teacher_topk, topk_from_rows, train_gkd,
                             train_kd, vocab_fingerprint)
from stockdistill.prompt import label_text
from stockdistill.train import LabelCollator, _demo_texts, answer_only_loss, build_tiny_student, train_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer, label_for, scripted_logprobs  # noqa: E402

SHAPE = dict(vocab_size=512, heads=4, kv_heads=2, max_position_embeddings=1024)

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py

def _write(path, recs):
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
    return path

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "A random student (2x64) and teacher (3x96) on one tokenizer, and demo records with outcomes."
    d = tmp_path_factory.mktemp('kd')
    recs = _demo_texts(24, seed=5)
    for i, r in enumerate(recs): r['outcome'] = dict(direction=('up', 'down', 'flat')[i % 3])
    texts = [r['prompt'] for r in recs] + [r['label'] for r in recs]
    student, tok = build_tiny_student(texts, d/'student', hidden_size=64, layers=2, intermediate_size=128, **SHAPE)
    teacher, _ = build_tiny_student(texts, d/'teacher', hidden_size=96, layers=3, intermediate_size=192, seed=1, **SHAPE)
    return dict(dir=d, recs=recs, tok=tok, student=student.eval(), teacher=teacher.eval(),
                train=_write(d/'train.jsonl', recs[:16]), val=_write(d/'val.jsonl', recs[16:]))

def test_kd_loss_by_hand_with_temperature_alpha_and_prompt_masking(toy):
    "On a real padded batch: only answer positions count, each as α·T²·KL(p_t,T‖p_s,T) + (1-α)·CE, divided by N."
    tok, recs = toy['tok'], toy['recs']
    b = LabelCollator(tok, 1024)(recs[:2])
    torch.manual_seed(0)
    full_s, full_t = torch.randn(*b['input_ids'].shape, len(tok)), torch.randn(*b['input_ids'].shape, len(tok))
    keep, labels = b['logits_to_keep'], b['labels']
    target = labels[:, 1:][keep[:, :-1]]
    T, a, total, n = 1.7, 0.4, 0.0, 0
    for i in range(labels.shape[0]):               # by hand: walk every position, skip those whose next token is not a label
        for p in range(labels.shape[1] - 1):
            if labels[i, p + 1] == -100: continue
            pt, ps = torch.softmax(full_t[i, p]/T, -1), torch.softmax(full_s[i, p]/T, -1)
            kl = float((pt*(pt.log() - ps.log())).sum())
            total += a*T*T*kl - (1 - a)*float(torch.log_softmax(full_s[i, p], -1)[labels[i, p + 1]]); n += 1
    assert n == int((labels[:, 1:] != -100).sum()) == len(target)
    loss, parts = kd_loss(full_s[keep], target, teacher_logits=full_t[keep], alpha=a, temperature=T, num_items=n)
    assert loss.item() == pytest.approx(total/n, rel=1e-5)
    assert (parts['covered'], loss.item()) == (n, pytest.approx((a*T*T*parts['kd'] + (1 - a)*parts['ce']).item(), rel=1e-5))
    half, _ = kd_loss(full_s[keep], target, teacher_logits=full_t[keep], alpha=a, temperature=T, num_items=2*n)
    assert half.item() == pytest.approx(loss.item()/2, rel=1e-6)   # normalised by the accumulated batch's count

def test_alpha_zero_is_the_sft_loss(toy):
    tok, recs, student, teacher = toy['tok'], toy['recs'], toy['student'], toy['teacher']
    b = LabelCollator(tok, 1024)(recs[:3])
    inputs = {k: b[k] for k in ('input_ids', 'attention_mask', 'logits_to_keep')}
    with torch.no_grad(): out, t = student(**inputs), teacher(**inputs)
    keep, labels = b['logits_to_keep'], b['labels']
    n = (labels[:, 1:] != -100).sum()
    target = labels[:, 1:][keep[:, :-1]]
    for kind in ('forward', 'reverse', 'jsd'):
        got = kd_loss(out.logits, target, teacher_logits=t.logits, alpha=0.0, temperature=3.0, kind=kind, num_items=n)[0]
        assert got.item() == pytest.approx(answer_only_loss(out, labels, n).item(), rel=1e-6)

def test_topk_renormalisation_and_divergences_by_hand():
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 7), torch.randn(4, 7), torch.tensor([0, 3, 6, 2])
    top = torch.log_softmax(t, -1).topk(3, -1)
    T = 2.0
    pt = torch.softmax(top.values/T, -1)                                   # teacher renormalised over its k tokens
    ps_full = torch.log_softmax(s/T, -1).gather(-1, top.indices)           # forward: the student's full distribution
    want = (pt*(pt.log() - ps_full)).sum(-1).mean()*T*T
    got = kd_loss(s, y, topk_ids=top.indices, topk_logprobs=top.values, alpha=1.0, temperature=T)[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    ps = torch.softmax(s.gather(-1, top.indices)/T, -1)                    # reverse/JSD: student renormalised too
    rev = (ps*(ps.log() - pt.log())).sum(-1).mean()*T*T
    assert kd_loss(s, y, topk_ids=top.indices, topk_logprobs=top.values, alpha=1.0, temperature=T, kind='reverse')[0].item() \
        == pytest.approx(rev.item(), rel=1e-5)
    b = 0.3                                                                # TRL's generalised JSD: M = b·t + (1-b)·s
    m = b*pt + (1 - b)*ps
    jsd = (b*(pt*(pt.log() - m.log())).sum(-1) + (1 - b)*(ps*(ps.log() - m.log())).sum(-1)).mean()*T*T
    assert kd_loss(s, y, topk_ids=top.indices, topk_logprobs=top.values, alpha=1.0, temperature=T, kind='jsd', beta=b)[0].item() \
        == pytest.approx(jsd.item(), rel=1e-5)
    full = kd_loss(s, y, teacher_logits=t, alpha=1.0, kind='jsd', beta=b)[0]   # full distributions: same formula over V
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1); m = b*p_t + (1 - b)*p_s
    assert full.item() == pytest.approx(((b*(p_t*(p_t/m).log()).sum(-1) + (1 - b)*(p_s*(p_s/m).log()).sum(-1)).mean()).item(), rel=1e-5)
    has = torch.tensor([True, False, True, False])                         # no teacher: cross-entropy alone
    mixed = kd_loss(s, y, teacher_logits=t, alpha=0.5, has_teacher=has)[0]
    ce = F.cross_entropy(s, y, reduction='none')
    kl = (p_t*(p_t.log() - torch.log_softmax(s, -1))).sum(-1)
    assert mixed.item() == pytest.approx(float(torch.where(has, 0.5*kl + 0.5*ce, ce).mean()), rel=1e-5)

def test_stored_topk_round_trips(toy, tmp_path):
    tok, recs, teacher = toy['tok'], toy['recs'], toy['teacher']
    store = teacher_topk(teacher, tok, recs[:5], k=6, batch_size=2, name='toy')
    path = save_topk(store, tmp_path/'top6_logprobs.npz')
    back = load_topk(path, tok)
    assert back.ids == store.ids and back.k == 6 and back.meta['vocab'] == vocab_fingerprint(tok)
    assert back.topk_ids.dtype == np.uint16 and back.topk_logprobs.dtype == np.float16
    coll = LabelCollator(tok, 1024)
    b = coll(recs[:1])
    with torch.no_grad():
        lp = torch.log_softmax(teacher(**{k: b[k] for k in ('input_ids', 'attention_mask', 'logits_to_keep')}).logits, -1)
    ans, ids, lps = back.get(recs[0]['id'])
    assert list(map(int, ans)) == [t for t in coll.encode(recs[0])[1] if t != -100]
    assert (ids.astype(np.int64) == lp.topk(6, -1).indices.numpy()).all()
    assert np.allclose(lps.astype(np.float32), lp.topk(6, -1).values.numpy(), atol=2e-2)
    assert back.get('nope') is None
    rows = [('a', [5, 6], [[5, 1], [6, 2]], [[-0.5, -1.5], [-0.25, float('-inf')]])]   # hand-built, with an absent entry
    hand = load_topk(save_topk(topk_from_rows(rows, dict(k=2, vocab_size=70000)), tmp_path/'h.npz'))
    assert hand.topk_ids.dtype == np.int32 and hand.get('a')[2].tolist() == [[-0.5, -1.5], [-0.25, float('-inf')]]
    other = train_tiny_tokenizer([r['prompt'] for r in recs[:4]], vocab_size=300)
    with pytest.raises(VocabMismatchError, match='another vocabulary'): load_topk(path, other)
    c = kd_collator(back)(tok, 1024)
    kb = c(recs[:2] + [dict(recs[2], id='unknown')])
    n2 = sum(1 for r in recs[:2] for t in coll.encode(r)[1] if t != -100)
    assert kb['kd_has_teacher'].tolist() == [True]*n2 + [False]*(len(kb['kd_has_teacher']) - n2)
    assert issubclass(kd_collator(None), KDCollator)

def test_topk_from_a_logprobs_server(toy):
    tok = toy['tok']
    recs = [dict(r, label=json.dumps(label_for(r['prompt']), ensure_ascii=False)) for r in toy['recs'][:3]]
    with ChatServer(tokenizer=tok) as srv:
        store = server_topk(recs, srv.base_url, tok, model='teacher-32b', k=4, concurrency=3)
        assert all(c.get('model') == 'teacher-32b' for c in srv.calls) and len(srv.calls) == 3
    coll = LabelCollator(tok, 1024)
    for r in recs:
        label_ids = [t for t in coll.encode(r)[1] if t != -100]
        ans, ids, lps = store.get(r['id'])
        assert list(map(int, ans)) == label_ids[:-1]                            # generated = the label, EOS not listed
        want_ids, want_lp = scripted_logprobs(label_ids[:-1], 4, len(tok))
        assert ids.astype(np.int64).tolist() == want_ids
        assert np.allclose(lps.astype(np.float32), want_lp, atol=1e-2)
    kb = kd_collator(store)(tok, 1024)(recs[:1])
    assert kb['kd_has_teacher'].tolist() == [True]*(len(kb['kd_has_teacher']) - 1) + [False]   # EOS has no stored distribution
    assert align_answer([7, 8, 9, 10], [1, 2, 7, 8, 9, 3]) == (2, 3)

def test_vocabulary_mismatch_is_refused_naming_both_sizes(toy, tmp_path):
    other = train_tiny_tokenizer([r['prompt'] for r in toy['recs'][:6]], vocab_size=300)
    with pytest.raises(VocabMismatchError, match=rf"student vocabulary has {len(other.get_vocab()):,} tokens, teacher vocabulary "
                                                 rf"{len(toy['tok'].get_vocab()):,}"):
        load_kd_teacher(f"hf:{toy['dir']/'teacher'}", other)
    stranger, _ = build_tiny_student([r['prompt'] for r in toy['recs'][:6]], tmp_path/'stranger', hidden_size=32, layers=1,
                                     intermediate_size=64, **{**SHAPE, 'vocab_size': 300})
    cfg = DistillConfig(run_name='x', runs_dir=str(tmp_path), student=str(tmp_path/'stranger'), method='kd',
                        teacher=f"hf:{toy['dir']/'teacher'}", max_steps=1)
    with pytest.raises(VocabMismatchError, match='teacher vocabulary'): train_kd(cfg, toy['train'])

def test_settings_errors_name_the_flag():
    cfg = DistillConfig()
    for k, v, flag in (('kd_alpha', 1.5, '--kd-alpha'), ('kd_loss', 'kl', '--kd-loss'), ('kd_beta', -1, '--kd-beta'),
                       ('kd_logits', 'disk', '--kd-logits'), ('gkd_lmbda', 2, '--gkd-lmbda'), ('kd_temperature', 0, '--kd-temperature')):
        with pytest.raises(ValueError, match=flag): kd_settings(cfg.replace(**{k: v}))
    assert layer_map(None, 4, 6) == [(1, 2), (2, 3), (3, 4), (4, 6)]
    with pytest.raises(ValueError, match='--kd-layer-map'): layer_map('1-2', 4, 6)

def _cfg(toy, tmp_path, **kw):
    return DistillConfig(run_name='r', runs_dir=str(tmp_path), student=str(toy['dir']/'student'), teacher=f"hf:{toy['dir']/'teacher'}",
                         max_steps=2, batch_size=2, grad_accum=2, lr=1e-3, lora_r=4, max_len=1024, gradient_checkpointing=False).replace(**kw)

def test_gkd_with_lambda_zero_trains_on_teacher_text_only(toy, tmp_path, monkeypatch):
    import stockdistill.kd as kd
    def no_sampling(*a, **k): raise AssertionError('lmbda=0 without seq_kd must not sample')
    monkeypatch.setattr(kd, 'sample_answers', no_sampling)
    s = train_gkd(_cfg(toy, tmp_path, method='gkd', gkd_lmbda=0.0), toy['train'], toy['val'])
    assert s['kd']['batches'] == {'labels': 4} and s['steps'] == 2 and s['kd']['loss'] == 'jsd'

def test_gkd_with_lambda_one_and_seq_kd_sample(toy, tmp_path):
    s = train_gkd(_cfg(toy, tmp_path, method='gkd', gkd_lmbda=1.0, gkd_max_new_tokens=4), toy['train'])
    assert s['kd']['batches'] == {'student': 4}
    s = train_gkd(_cfg(toy, tmp_path, method='gkd', gkd_lmbda=0.0, gkd_seq_kd=True, gkd_max_new_tokens=4, out='a2'), toy['train'])
    assert s['kd']['batches'] == {'teacher': 4}

def test_kd_hidden_saves_its_projection_and_offline_reuses_the_file(toy, tmp_path):
    s = train_kd(_cfg(toy, tmp_path, method='kd', kd_logits='offline', kd_top_k=5), toy['train'])
    assert s['kd']['topk_coverage'] == 1.0 and s['kd']['teacher_pass_s'] > 0 and Path(s['kd']['topk_file']).exists()
    again = train_kd(_cfg(toy, tmp_path, method='kd', kd_logits='offline', kd_top_k=5, out='again'), toy['train'])
    assert again['kd']['teacher_pass_s'] == 0.0 and again['kd']['topk_file'] == s['kd']['topk_file']
    from stockdistill.kd import train_kd_hidden
    h = train_kd_hidden(_cfg(toy, tmp_path, method='kd-hidden', kd_layer_map='2:3', out='hid'), toy['train'])
    p = HiddenProjector.load(Path(h['adapter']))
    assert p.pairs == [(2, 3)] and p.proj[0].weight.shape == (96, 64) and h['kd']['hidden_pairs'] == [[2, 3]]

def test_calibration_maths_by_hand():
    P = np.array([[.7, .2, .1], [.1, .8, .1], [.3, .3, .4], [.5, .25, .25]]); y = ['up', 'down', 'up', 'flat']
    assert brier(P, y) == pytest.approx(np.mean([.3**2 + .2**2 + .1**2, .1**2 + .2**2 + .1**2, .7**2 + .3**2 + .4**2,
                                                 .5**2 + .25**2 + .75**2]))
    # bins: 0.7 (right), 0.8 (right), 0.4 (wrong), 0.5 (wrong): each 1/4 of the windows
    assert ece(P, y) == pytest.approx(.25*(.3 + .2 + .4 + .5))
    assert nll(P, y) == pytest.approx(-np.mean(np.log([.7, .8, .3, .25])))
    assert np.allclose(scale_probs(np.log(P), 2.0), np.sqrt(P)/np.sqrt(P).sum(1, keepdims=True))
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3000, 3)); yy = [rng.choice(3, p=np.exp(r)/np.exp(r).sum()) for r in z]
    assert fit_temperature(0.5*z, yy) == pytest.approx(0.5, rel=0.15)      # under-confident: T < 1 sharpens
    assert fit_temperature(4*z, yy) == pytest.approx(4.0, rel=0.15)

def test_direction_probabilities_of_a_student(toy):
    recs, tok, student = toy['recs'], toy['tok'], toy['student']
    phrases = prediction_phrases(recs)
    assert set(phrases) == {'up', 'down', 'flat'} and all(phrases.values())
    lp, mass = direction_logprobs(student, tok, [r['prompt'] for r in recs[:2]], phrases)
    assert lp.shape == (2, 3) and np.allclose(np.exp(lp).sum(1), 1) and ((0 < mass) & (mass <= 1)).all()
    res = calibrate(student, tok, recs[:16], recs[16:20], recs[20:], 'test')
    assert (res['n'], res['n_fit'], res['split']) == (4, 4, 'test') and res['temperature'] > 0
    assert set(res['raw']) == {'ece', 'brier', 'nll', 'accuracy'} and label_text({'a': 1}) == '{"a": 1}'

def test_calibration_without_a_test_split_cross_fits(toy, monkeypatch):
    "No fit records: each fold is scaled with the temperature fitted on the other folds, never on itself."
    import stockdistill.kd as kd
    recs, tok, student = toy['recs'], toy['tok'], toy['student']
    seen = []
    real_fit = kd.fit_temperature
    monkeypatch.setattr(kd, 'fit_temperature', lambda lp, y: seen.append(len(y)) or real_fit(lp, y))
    res = calibrate(student, tok, recs[:16], None, recs[16:], 'val', folds=2)
    assert seen == [4, 4] and res['n'] == 8 and len(res['temperatures']) == 2
    lp = np.log(res['_arrays']['raw'])
    for f, T in enumerate(res['temperatures']):
        assert np.allclose(res['_arrays']['scaled'][f::2], scale_probs(lp[f::2], T), atol=1e-3)

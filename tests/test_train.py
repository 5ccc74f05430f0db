"Student training: the label mask, truncation, a real (tiny) training run, adapter reload in a fresh process, QLoRA on CPU, RoPE."
import json
import subprocess
import sys
import textwrap
import pytest
import torch
from stockdistill.config import DistillConfig, LORA_TARGETS
from stockdistill.train import LabelCollator, _demo_texts, train_student, train_tiny_tokenizer, build_tiny_student, TINY_PRESET
from stockdistill.prompt import ANSWER_MARK, format_example
from stockdistill.generate import EMBEDDED_STUDENT, load_base, load_student
from stockdistill.rope import scale_rope

@pytest.fixture(scope='module')
def records(): return _demo_texts(32, seed=3)

@pytest.fixture(scope='module')
def tok(records): return train_tiny_tokenizer([r['prompt'] for r in records] + [r['label'] for r in records], vocab_size=1024)

def _write(path, recs):
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
    return path

def test_collator_exact_labels(tok):
    prompt, label = '股票 000001 近2日K线数据: [ ]\n涨跌幅: -2.50%。', '{"prediction": "下跌", "advice": "观望"}'
    coll = LabelCollator(tok, max_len=4096)
    b = coll([dict(id='long', prompt=prompt, label=label), dict(id='short', prompt='问', label='{}')])
    p = tok(prompt + '\n\n' + ANSWER_MARK, add_special_tokens=False)['input_ids']
    a = tok(label, add_special_tokens=False)['input_ids']
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert b['input_ids'][0].tolist() == p + a + [eos]
    assert b['labels'][0].tolist() == [-100]*len(p) + a + [eos]
    assert tok.decode(b['labels'][0][b['labels'][0] != -100]) == label + '<|endoftext|>'
    n = len(tok(format_example('问'), add_special_tokens=False)['input_ids']) + len(tok('{}', add_special_tokens=False)['input_ids']) + 1
    row, labels, mask = b['input_ids'][1].tolist(), b['labels'][1].tolist(), b['attention_mask'][1].tolist()
    assert row[n:] == [pad]*(len(row) - n) and labels[n:] == [-100]*(len(row) - n) and mask == [1]*n + [0]*(len(row) - n)
    assert labels[n-1] == eos and labels[:n-3] == [-100]*(n-3)
    assert coll.n_answer_truncated == 0

def test_all_truncated_is_an_error_naming_the_example(tok):
    ex = dict(id='600519_7', prompt='股票 600519 ' + '很长的提示' * 50, label='{"prediction": "上涨"}')
    n_prompt = len(tok(format_example(ex['prompt']), add_special_tokens=False)['input_ids'])
    with pytest.raises(ValueError, match=r"600519_7.*raise max_len or lower max_tokens"): LabelCollator(tok, max_len=n_prompt)([ex])
    no_id = dict(prompt=ex['prompt'], label=ex['label'])
    with pytest.raises(ValueError, match='股票 600519'): LabelCollator(tok, max_len=n_prompt - 5)([no_id])

def test_partial_truncation_is_counted(tok, records):
    coll = LabelCollator(tok, max_len=4096)
    lens = [len(coll.encode(r)[0]) for r in records[:4]]
    n_prompt = len(tok(format_example(records[0]['prompt']), add_special_tokens=False)['input_ids'])
    cut = LabelCollator(tok, max_len=n_prompt + 3)
    b = cut(records[:1]); cut(records[:1])   # the same example seen twice counts once
    assert b['input_ids'].shape[1] == n_prompt + 3 and (b['labels'][0] != -100).sum().item() == 3
    assert cut.n_answer_truncated == 1
    assert LabelCollator(tok, max_len=max(lens))(records[:4])['input_ids'].shape[1] == max(lens)

@pytest.fixture(scope='module')
def trained(tmp_path_factory, records):
    d = tmp_path_factory.mktemp('run')
    train, val = _write(d/'train.jsonl', records[:24]), _write(d/'val.jsonl', records[24:])
    cfg = DistillConfig(run_name='t', runs_dir=str(d), max_steps=24, lr=3e-3, batch_size=4, seed=0)
    return cfg, train, val, train_student(cfg, train, val)

def test_training_lowers_the_loss(trained):
    cfg, *_, s = trained
    assert s['steps'] == 24 and s['first_loss'] > 4
    assert s['final_loss'] < 0.6*s['first_loss'], s['losses']
    assert s['eval_loss'] < 0.6*s['first_loss'] and (len(s['eval_losses']) < 2 or s['eval_losses'][-1][1] < s['eval_losses'][0][1]), s['eval_losses']
    out = cfg.path('lora_adapter')
    for f in ('adapter_config.json', 'adapter_model.safetensors', 'tokenizer.json', 'train_summary.json', 'progress.png'):
        assert (out/f).exists(), f
    assert s['trainable_params'] > 0 and s['tokens_per_s'] > 0 and s['n_answer_truncated'] == 0

def test_answer_cuts_are_counted_per_split(records, tmp_path):
    "Validation answers cut by max_len count as validation cuts only, even though the Trainer collates them too."
    train = records[:8]
    longest = max(len(format_example(r['prompt'], r['label'])) for r in train)   # characters >= tokens here
    val = [dict(records[8], id='long', label=records[8]['label']*40)]
    cfg = DistillConfig(run_name='cut', runs_dir=str(tmp_path), max_steps=2, batch_size=4, max_len=longest + 8, seed=0)
    s = train_student(cfg, _write(tmp_path/'train.jsonl', train), _write(tmp_path/'val.jsonl', val))
    assert (s['n_answer_truncated'], s['n_val_answer_truncated']) == (0, 1)


def test_adapter_reloads_in_a_fresh_process_with_plain_peft(trained, records, tmp_path):
    cfg, *_, s = trained
    model, tok = load_student(adapter=s['adapter'])
    ids = tok(format_example(records[25]['prompt']), return_tensors='pt')['input_ids']
    with torch.no_grad(): mine, bare = model(ids).logits, load_student(s['base'])[0](ids).logits
    assert not torch.allclose(mine, bare, atol=1e-3)        # the adapter changes the model
    torch.save(ids, tmp_path/'ids.pt')
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({s['base']!r}, dtype=torch.float32), {s['adapter']!r}).eval()
        with torch.no_grad(): torch.save(model(torch.load({str(tmp_path/'ids.pt')!r})).logits, {str(tmp_path/'logits.pt')!r})
    """)
    subprocess.run([sys.executable, '-c', script], check=True, capture_output=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path/'logits.pt'), mine, atol=1e-5, rtol=1e-5)

def test_resume_only_when_the_training_is_the_same(trained, capsys):
    "An identical rerun resumes (no step lost, the whole loss history kept); another lr or step count trains anew."
    cfg, train, val, s = trained
    s2 = train_student(cfg, train, val, resume=True)
    assert s2['resumed_from'] and s2['resumed_from'].endswith('checkpoint-24')
    assert (s2['steps'], s2['steps_this_run'], s2['losses']) == (24, 0, s['losses'])
    s3 = train_student(cfg.replace(max_steps=4, lr=1e-3), train, val, resume=True)
    assert s3['resumed_from'] is None and (s3['steps'], s3['steps_this_run'], s3['lr']) == (4, 4, 1e-3)
    assert 'training settings changed since the last checkpoint (lr, max_steps)' in capsys.readouterr().out
    summary = json.loads((cfg.adapter_dir/'train_summary.json').read_text())
    assert (summary['steps'], summary['lr']) == (4, 1e-3) and len(summary['losses']) == len(s3['losses'])

def test_an_explicit_value_wins_over_the_tiny_preset(records, tmp_path):
    cfg = DistillConfig(run_name='p', runs_dir=str(tmp_path), max_steps=1, lr=1e-4, batch_size=1, seed=0)
    s = train_student(cfg, _write(tmp_path/'train.jsonl', records[:4]))
    assert (s['lr'], s['batch_size'], s['grad_accum'], s['lora_r']) == (1e-4, 1, 1, TINY_PRESET['lora_r'])   # the preset fills only what is unset

def test_qlora_runs_on_cpu(tmp_path, records):
    base = tmp_path/'base'
    build_tiny_student([r['prompt'] for r in records] + [r['label'] for r in records], base, hidden_size=64, intermediate_size=128)
    import bitsandbytes as bnb
    m = load_base(str(base), load_in_4bit=True)
    assert any(isinstance(x, bnb.nn.Linear4bit) for x in m.modules())
    del m
    s = train_student(DistillConfig(run_name='q', runs_dir=str(tmp_path), student=str(base), load_in_4bit=True, max_steps=2,
                                    lr=1e-3, batch_size=2), _write(tmp_path/'train.jsonl', records[:8]))
    assert s['load_in_4bit'] and s['steps'] == 2 and all(l == l and l > 0 for _, l in s['losses'])

def test_rope_factor(tmp_path, records):
    base = tmp_path/'base'
    build_tiny_student([r['prompt'] for r in records[:8]], base, hidden_size=32, intermediate_size=64, max_position_embeddings=512)
    m = load_base(str(base), rope_factor=4, rope_type='dynamic')
    assert m.config.max_position_embeddings == 2048
    assert m.config.rope_parameters['rope_type'] == 'dynamic' and m.config.rope_parameters['factor'] == 4.0
    for bad in (1, 0.5):
        with pytest.raises(ValueError, match='must be > 1'): DistillConfig(rope_factor=bad)
        with pytest.raises(ValueError, match='must be > 1'): scale_rope(m.config, bad)

def test_fused_lora_trains_like_peft(tmp_path, records):
    "`fused_lora` (the CUDA default, forced here on the CPU) takes the same steps as PEFT's own LoRA forward, 4-bit base too."
    train = _write(tmp_path/'train.jsonl', records[:8])
    runs = {f: train_student(DistillConfig(run_name=f'f{f}', runs_dir=str(tmp_path), max_steps=4, lr=3e-3, batch_size=2, seed=0,
                                           lora_dropout=0.1, fused_lora=f), train) for f in (False, True)}
    layers = json.loads((EMBEDDED_STUDENT/'config.json').read_text())['num_hidden_layers']
    assert (runs[True]['fused_lora'], runs[False]['fused_lora']) == (layers*len(LORA_TARGETS), 0)   # every LoRA layer routed
    plain, fused = ([l for _, l in runs[f]['losses']] for f in (False, True))
    assert len(plain) == len(fused) >= 2 and plain != [plain[0]]*len(plain)
    assert fused == pytest.approx(plain, rel=1e-4)                     # same dropout masks, same arithmetic up to rounding
    base = tmp_path/'base'
    build_tiny_student([r['prompt'] for r in records] + [r['label'] for r in records], base, hidden_size=64, intermediate_size=128)
    q = {f: train_student(DistillConfig(run_name=f'q{f}', runs_dir=str(tmp_path), student=str(base), load_in_4bit=True, max_steps=2,
                                        lr=1e-3, batch_size=2, seed=0, fused_lora=f), train) for f in (False, True)}
    assert q[True]['fused_lora'] > 0 and q[True]['load_in_4bit']
    assert [l for _, l in q[True]['losses']] == pytest.approx([l for _, l in q[False]['losses']], rel=1e-4)

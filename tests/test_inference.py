"""Tests of the generation core (echo stripping, batched generation: order, EOS, merge) and of `ask` and its CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stockdistill.generate import strip_echo, generate_answers, load_model
from stockdistill.inference import extract_codes, ask, stock_bars, latest_prompt
from stockdistill.prompt import ANSWER_MARK, format_example

ROOT = Path(__file__).resolve().parents[1]


# ---------- echo stripping and codes ----------

@pytest.mark.parametrize('text,want', [
    (format_example('股票 600031 近5日K线数据: [...]', '{"prediction": "上涨"}'), '{"prediction": "上涨"}'),
    (f'prompt\n\n{ANSWER_MARK}\n  answer  \n', 'answer'),
    (f'p{ANSWER_MARK}a{ANSWER_MARK}b', f'a{ANSWER_MARK}b'),     # only the echo is cut, the answer keeps its text
    ('  no marker here ', 'no marker here'),
    (f'p{ANSWER_MARK}', ''),
    ('', ''),
])
def test_strip_echo(text, want):
    assert strip_echo(text) == want


def test_extract_codes():
    assert extract_codes('请问股票600000未来走势如何？') == ['600000']
    assert extract_codes('600031和000002哪个好？600031呢') == ['600031', '000002']
    assert extract_codes('1234567 和 600031') == ['600031']
    with pytest.raises(ValueError, match='no six-digit stock code'): extract_codes('请问茅台未来走势如何？')


def test_stock_bars_clear_error_for_a_code_not_bundled():
    with pytest.raises(ValueError, match='not in the bundled data.*--data-source eastmoney'): stock_bars('600000')
    bars = stock_bars('600031')
    assert len(bars) > 1000 and bars['date'].is_monotonic_increasing


# ---------- generation ----------

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A tiny random student on real prompts of different lengths, saved to a folder."
    from stockdistill.train import build_tiny_student
    from stockdistill.data import load_bars
    from stockdistill.prompt import make_prompt
    prompts = [make_prompt(c, load_bars(c).iloc[-n:]) for c, n in
               [('600031', 9), ('000002', 3), ('601138', 14), ('000333', 5), ('000651', 2), ('600031', 6)]]
    d = tmp_path_factory.mktemp('tiny')/'student'
    model, tok = build_tiny_student(prompts, d, vocab_size=512)
    return model, tok, prompts, d


def seed_answers(model, tok, prompts, max_new_tokens):
    "The seed's way: one `generate` call per prompt, decode everything, strip the echo."
    with torch.inference_mode():
        outs = [model.generate(**tok(format_example(p), return_tensors='pt'), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)[0] for p in prompts]
    return [strip_echo(tok.decode(o, skip_special_tokens=True)) for o in outs]


def test_batched_answers_keep_order_and_match_one_by_one(tiny):
    model, tok, prompts, _ = tiny
    stats = {}
    batched = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=10, stats=stats)
    single = [generate_answers(model, tok, [p], batch_size=1, max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert generate_answers(model, tok, prompts[::-1], batch_size=3, max_new_tokens=10) == batched[::-1]
    assert len(set(batched)) > 1                        # different prompts, different answers: order matters
    assert stats['prompts'] == 6 and 0 < stats['new_tokens'] <= 60 and stats['seconds'] > 0
    assert tok.padding_side == 'right'                  # the tokenizer is left as it was


@pytest.mark.parametrize('prefill', ['each', 'padded'])
def test_every_prefill_gives_the_seed_ways_answers(tiny, prefill):
    "Batches prefilled prompt by prompt or left-padded answer exactly as one `generate` call per prompt does."
    model, tok, prompts, _ = tiny
    seed_way = seed_answers(model, tok, prompts, max_new_tokens=12)
    stats = {}
    assert generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=12, prefill=prefill, stats=stats) == seed_way
    assert stats['prefill'] == prefill


def test_auto_prefill_is_each_on_cpu_and_sampling_goes_through_the_cache(tiny):
    model, tok, prompts, _ = tiny
    stats = {}
    generate_answers(model, tok, prompts[:2], batch_size=2, max_new_tokens=2, stats=stats)
    assert stats['prefill'] == 'each'
    sampled = {}
    for mode in ('each', 'padded'):     # same logits and the same random stream give the same samples
        torch.manual_seed(0)
        sampled[mode] = generate_answers(model, tok, prompts, batch_size=6, max_new_tokens=10, do_sample=True,
                                         top_k=0, prefill=mode)
    assert sampled['each'] == sampled['padded']
    assert sampled['each'] != generate_answers(model, tok, prompts, batch_size=6, max_new_tokens=10)


def test_prefilled_cache_holds_each_prompt_as_computed_alone(tiny):
    from stockdistill.generate import prefilled_cache, _cache_arg
    model, tok, prompts, _ = tiny
    rows = [tok(format_example(p))['input_ids'] for p in prompts]
    width = max(map(len, rows)) - 1
    cache = prefilled_cache(model, rows, max_new_tokens=3)
    assert cache.get_seq_length() == width
    with torch.inference_mode():
        for i in (0, 1, 4):
            alone = getattr(model(input_ids=torch.tensor([rows[i][:-1]]), use_cache=True), _cache_arg())
            n = len(rows[i]) - 1
            for l, layer in enumerate(cache.layers):
                assert torch.allclose(layer.keys[i, :, width-n:width], alone.layers[l].keys[0], atol=1e-6)
                assert torch.allclose(layer.values[i, :, width-n:width], alone.layers[l].values[0], atol=1e-6)
                assert layer.keys[i, :, :width-n].abs().sum() == 0          # left padding stays empty
        layer = cache.layers[0]
        k, v = layer.update(layer.keys[:, :, :1].clone(), layer.values[:, :, :1].clone())
    assert k.shape[2] == v.shape[2] == width + 1        # decoding reads the filled part only, not the room left


def test_bad_prefill_is_a_clear_error(tiny):
    model, tok, prompts, _ = tiny
    with pytest.raises(ValueError, match="prefill='fast'"): generate_answers(model, tok, prompts, prefill='fast')
    with pytest.raises(ValueError, match='beam search'): generate_answers(model, tok, prompts, prefill='each', num_beams=2)
    stats = {}
    generate_answers(model, tok, prompts[:2], batch_size=2, max_new_tokens=2, num_beams=2, stats=stats)
    assert stats['prefill'] == 'padded'                 # 'auto' takes the padded batch for beam search


def test_answers_are_the_seed_way_with_the_echo_cut(tiny):
    "Batched answers equal the seed's: generate on one prompt, decode everything, strip the echo."
    model, tok, prompts, _ = tiny
    seed_way = seed_answers(model, tok, prompts[2:3], max_new_tokens=10)[0]
    assert generate_answers(model, tok, prompts, batch_size=6, max_new_tokens=10)[2] == seed_way


def test_eos_stops_only_its_row(tiny):
    model, tok, prompts, _ = tiny
    full = generate_answers(model, tok, prompts, batch_size=3, max_new_tokens=10)
    with torch.inference_mode():
        first = model.generate(**tok(format_example(prompts[0]), return_tensors='pt'), max_new_tokens=1,
                               do_sample=False, pad_token_id=tok.pad_token_id)[0, -1].item()
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, first]   # declare that token an end of answer
    try: stopped = generate_answers(model, tok, prompts, batch_size=3, max_new_tokens=10)
    finally: model.generation_config.eos_token_id = saved
    assert stopped[0] == ''
    assert all(f.startswith(s) for f, s in zip(full, stopped))


def test_merge_gives_the_same_answers(tiny):
    from peft import LoraConfig, get_peft_model
    model, tok, prompts, d = tiny
    import copy
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules=['q_proj', 'v_proj', 'down_proj'],
                                                           init_lora_weights=False, task_type='CAUSAL_LM'))
    plain = generate_answers(model, tok, prompts, max_new_tokens=8)
    adapted = generate_answers(peft, tok, prompts, max_new_tokens=8)
    merged = generate_answers(peft, tok, prompts, max_new_tokens=8, merge=True)
    assert adapted == merged and adapted != plain       # the adapter changes answers; merging does not


def test_bad_batch_size(tiny):
    model, tok, prompts, _ = tiny
    with pytest.raises(ValueError, match='batch_size=0'): generate_answers(model, tok, prompts, batch_size=0)


# ---------- ask and the CLI ----------

def test_ask_builds_the_dataset_prompt_for_the_same_window(monkeypatch):
    "As of a window's last day, `ask` writes exactly the prompt the dataset wrote for that window, with the same settings."
    from stockdistill.config import DistillConfig
    from stockdistill.dataset import build_dataset
    import stockdistill.inference as inf
    bars = stock_bars('000333')
    for kw in (dict(window=12), dict(window=30, indicators=True, max_tokens=1200)):
        r = build_dataset(codes=['000333'], windows=2, verbose=False, **kw)['train'][0]
        cut = bars[bars['date'] <= r['end']].reset_index(drop=True)      # the market as of the window's last day
        monkeypatch.setattr(inf, 'stock_bars', lambda code, source='bundled': cut)
        assert latest_prompt('000333', DistillConfig(**kw)) == r['prompt']


def test_ask_uses_the_settings_the_adapter_was_trained_with(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from stockdistill.config import DistillConfig
    _, _, prompts, d = tiny
    model, tok = load_model(d)
    run = DistillConfig(runs_dir=str(tmp_path), run_name='r', window=6)
    run.save()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],
                                            init_lora_weights=False, task_type='CAUSAL_LM'))
    peft.save_pretrained(run.adapter_dir)
    (run.adapter_dir/'train_summary.json').write_text(json.dumps({'prompt': {'window': 6, 'indicators': False, 'max_tokens': None,
                                                                              'context': '', 'counted': 'characters'}}))
    res = ask('请问股票600031未来走势如何？', student=run.adapter_dir, max_new_tokens=6, verbose=False)
    p = res[0]['prompt']
    assert p.startswith('股票 600031 近6日K线数据') and p == latest_prompt('600031', DistillConfig(window=6))
    assert res[0]['student'] == generate_answers(peft, tok, [p], max_new_tokens=6)[0]
    assert json.loads(res[0]['teacher'])['prediction']     # the run's teacher, the rule teacher


def run_cli(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE='1', **(env or {}))
    e.pop('ARK_API_KEY', None)
    return subprocess.run([sys.executable, '-m', 'stockdistill.inference', *args], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=180)


def test_cli_code_not_bundled_is_a_clear_error(tiny, tmp_path):
    r = run_cli('请问股票600000未来走势如何？', '--student', str(tiny[3]), '--runs-dir', str(tmp_path))
    assert r.returncode == 2 and 'stock 600000 is not in the bundled data' in r.stderr and '--data-source eastmoney' in r.stderr
    assert 'Traceback' not in r.stderr and r.stderr.strip().splitlines()[-1].startswith('stockdistill ask: error: stock 600000')
    r = run_cli('请问茅台未来走势如何？', '--student', str(tiny[3]), '--runs-dir', str(tmp_path))
    assert r.returncode == 2 and 'no six-digit stock code' in r.stderr


def test_cli_prints_prompt_teacher_and_student(tiny, tmp_path):
    r = run_cli('请问股票600031未来走势如何？', '--student', str(tiny[3]), '--teacher', 'rule', '--window', '8',
                '--max-new-tokens', '6', '--runs-dir', str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.index('=== 600031 prompt ===') < out.index('=== teacher ===') < out.index('=== student ===')
    assert '股票 600031 近8日K线数据' in out and '"prediction"' in out


def test_cli_skips_a_teacher_without_key(tiny, tmp_path):
    r = run_cli('请问股票600031未来走势如何？', '--student', str(tiny[3]), '--teacher', 'deepseek-r1',
                '--window', '5', '--max-new-tokens', '4', '--runs-dir', str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '[teacher skipped: set the environment variable ARK_API_KEY' in r.stdout
    assert '=== teacher ===' not in r.stdout and '=== student ===' in r.stdout


def test_bucketed_static_cache_gives_the_same_answers(tiny):
    "The CUDA path (static cache, widths padded to a bucket, batches filled to full size) answers as the eager one."
    model, tok, prompts, _ = tiny
    eager = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=8, prefill='padded', compile=False)
    stats = {}
    bucketed = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=8, compile=True, bucket=64, stats=stats)
    assert bucketed == eager and stats['compiled'] and stats['prefill'] == 'padded'


def test_one_static_cache_serves_every_batch_of_a_run(tiny, monkeypatch):
    """Every batch of a run, whatever its prompts' width, decodes over one static cache shape (so one CUDA graph):
    the cache is reset between batches, not carried over, and the answers are the eager ones."""
    import stockdistill.generate as g
    model, tok, prompts, _ = tiny
    widths = [len(r) for r in g.encode_prompts(tok, prompts)]     # windows of 2 to 14 days: widths far apart
    eager = generate_answers(model, tok, prompts, batch_size=2, max_new_tokens=8, prefill='padded', compile=False)
    seen, real = [], g._static_cache
    monkeypatch.setattr(g, '_static_cache', lambda m, b, s: seen.append((b, s)) or real(m, b, s))
    one_shape = generate_answers(model, tok, prompts, batch_size=2, max_new_tokens=8, compile=True, bucket=16)
    assert len(seen) == -(-len(prompts)//2) and set(seen) == {(2, -(-max(widths)//16)*16 + 8)}
    assert max(widths) - min(widths) > 16                         # the batches' own prompt widths did differ
    assert one_shape == eager

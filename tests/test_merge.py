"""Adapter merging and the LoRA mixture (05d_merge): the merges' contracts on random adapters (linear (1, 0) is the
first expert, cat adds ranks, ties/dare at density 1 of one expert is that expert), mismatched experts named, the
router's gates, a gate of 1 is that expert, and the command line's errors and starting settings."""
import json
import pytest
import torch
from stockdistill.config import DistillConfig
from stockdistill.merge import (MERGE_METHODS, MergeSettings, Router, adapter_deltas, balance_loss, check_experts, expert_part,
                                gated, load_experts, merge_adapters, merge_base_config, merge_settings, merge_weights,
                                efficiency_ratio)
from stockdistill.train import _demo_texts, build_tiny_student

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py

def _adapter(out, base, r=4, targets=('q_proj', 'v_proj'), seed=0):
    "A saved LoRA adapter with random A and B (a stand-in expert: PEFT's default B = 0 would make every delta zero)."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                       LoraConfig(r=r, lora_alpha=2*r, target_modules=list(targets), init_lora_weights=False))
    m.save_pretrained(out)
    return out

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp('merge')
    texts = [t for r in _demo_texts(8) for t in (r['prompt'], r['label'])]
    kw = dict(vocab_size=300, hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, max_position_embeddings=512)
    build_tiny_student(texts, d/'base', **kw)
    build_tiny_student(texts, d/'other', seed=1, **kw)
    return dict(dir=d, a=_adapter(d/'a', d/'base', seed=0), b=_adapter(d/'b', d/'base', seed=1),
                r2=_adapter(d/'r2', d/'base', r=2, seed=2), qk=_adapter(d/'qk', d/'base', targets=('q_proj', 'k_proj')),
                other=_adapter(d/'o', d/'other'))

def _same(x:dict, y:dict, eps=1e-5) -> bool:
    return sorted(x) == sorted(y) and max(float((x[k] - y[k]).abs().max()) for k in x) < eps

def test_linear_one_zero_is_the_first_expert(toy):
    merge_adapters([toy['a'], toy['b']], toy['dir']/'lin', 'linear', [1.0, 0.0])
    assert _same(adapter_deltas(toy['dir']/'lin'), adapter_deltas(toy['a']))
    assert not _same(adapter_deltas(toy['dir']/'lin'), adapter_deltas(toy['b']))
    cfg = json.loads((toy['dir']/'lin'/'adapter_config.json').read_text())
    assert (cfg['r'], cfg['lora_alpha']) == (4, 4)          # PEFT's merged adapter: alpha = r, scalings folded in

def test_cat_keeps_every_rank_and_sums_the_deltas(toy):
    info = merge_adapters([toy['a'], toy['r2']], toy['dir']/'cat', 'cat', [0.3, 0.7])
    assert (info['r'], info['expert_ranks']) == (6, [4, 2])
    da, d2, dc = adapter_deltas(toy['a']), adapter_deltas(toy['r2']), adapter_deltas(toy['dir']/'cat')
    assert _same(dc, {k: .3*da[k] + .7*d2[k] for k in da})

@pytest.mark.parametrize('method', ['ties', 'dare_ties', 'dare_linear', 'magnitude_prune'])
def test_pruning_merges_of_one_expert_at_density_one(toy, method):
    merge_adapters([toy['b']], toy['dir']/method, method, [1.0], density=1.0)
    assert _same(adapter_deltas(toy['dir']/method), adapter_deltas(toy['b']))

def test_mismatched_experts_are_named(toy):
    with pytest.raises(ValueError, match=f"different bases: {toy['a']} adapts .*base, {toy['other']} adapts .*other"):
        check_experts([toy['a'], toy['other']])
    with pytest.raises(ValueError, match=r"different modules: .*a \['q_proj', 'v_proj'\], .*qk \['k_proj', 'q_proj'\]"):
        check_experts([toy['a'], toy['qk']])
    with pytest.raises(ValueError, match=r'one LoRA rank: .*a has r=4, .*r2 has r=2'):
        merge_adapters([toy['a'], toy['r2']], toy['dir']/'x', 'ties')
    with pytest.raises(ValueError, match='merge with one of'):
        merge_adapters([toy['a']], toy['dir']/'x', 'svd')

def test_router_gates_sum_to_one_over_top_k():
    for k in (1, 2, 3):
        r = Router(16, 3, top_k=k)
        torch.nn.init.normal_(r.proj.weight)
        probs, gates = r(torch.randn(7, 16))
        assert torch.allclose(gates.sum(-1), torch.ones(7)) and ((gates > 0).sum(-1) == k).all()
        assert (gates.argmax(-1) == probs.argmax(-1)).all()     # the most probable expert has the largest gate
    assert Router(16, 3)(torch.randn(2, 16))[0].allclose(torch.full((2, 3), 1/3))   # untrained: no expert favoured
    assert balance_loss(torch.tensor([[.5, .5]]*4)).item() == pytest.approx(1.0)

def test_a_gate_of_one_is_that_expert(toy):
    model, tok, names = load_experts([toy['a'], toy['b']], device='cpu')
    ids = tok(['股票 600000 近10日K线数据']*2, return_tensors='pt')
    with torch.no_grad():
        with gated(model, names, torch.tensor([[0., 1.], [1., 0.]])): mixed = model(**ids).logits
        alone = []
        for n in names:
            model.base_model.set_adapter(n)
            alone.append(model(**ids).logits[0])
    assert torch.allclose(mixed[0], alone[1], atol=1e-5) and torch.allclose(mixed[1], alone[0], atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)

def test_settings_and_weights():
    s = merge_settings(DistillConfig().replace(weights='2,1'))
    assert isinstance(s, MergeSettings) and merge_weights(s, 2) == [2.0, 1.0]
    assert merge_weights(MergeSettings(), 3, 'ties') == [1.0]*3 and merge_weights(MergeSettings(), 4) == [0.25]*4
    with pytest.raises(ValueError, match=r'--weights 2,1: 2 weight\(s\) for 3 expert\(s\)'): merge_weights(s, 3)
    with pytest.raises(ValueError, match='--moe-top-k'): merge_settings(DistillConfig().replace(moe_top_k=0))
    assert set(MERGE_METHODS) == {'linear', 'cat', 'ties', 'dare_ties', 'dare_linear', 'magnitude_prune'}

def test_regime_reads_the_window_only():
    from stockdistill.dataset import build_dataset
    ds = build_dataset(DistillConfig(codes=['600031'], windows=6, val_ratio=0.2), write=False)
    for r in ds['train'] + ds['val']:
        later = dict(r, outcome={'direction': 'up', 'return_pct': 99.0})   # what happens after the window changes nothing
        assert expert_part(r) == expert_part(later) in ('trend', 'range')
    assert efficiency_ratio([1, 2, 3]) == 1.0 and efficiency_ratio([1, 2, 1]) == 0.0

def test_merge_command_errors_and_starting_settings(toy, capsys):
    from stockdistill.cli import main
    runs = toy['dir']/'runs'
    DistillConfig(runs_dir=str(runs), run_name='ex', windows=7, teacher='rule:trend').save()
    (runs/'ex'/'lora_adapter').mkdir(parents=True)
    for f in ('adapter_config.json', 'adapter_model.safetensors'): (runs/'ex'/'lora_adapter'/f).write_bytes((toy['a']/f).read_bytes())
    base = merge_base_config('ex', str(runs), 'ties')
    assert (base.run_name, base.windows, base.teacher, base.runs_dir) == ('merge-ties', 7, 'rule:trend', str(runs))
    from stockdistill.merge import merge_command
    with pytest.raises(SystemExit) as e: main(['merge', '--runs-dir', str(runs), '--experts', 'ex', '--method', 'sft'])   # one parser: 8 s on a busy machine
    assert e.value.code == 2 and '--method sft: merge combines experts with one of linear' in capsys.readouterr().err
    for changes, says in [(dict(method='linear', run_name='ex'), '--run-name ex: '),
                          (dict(method='cat', experts='ex,nowhere'), '--experts nowhere: neither an adapter folder nor a run folder'),
                          (dict(method='linear', experts=None), 'name the experts to combine with --experts')]:
        with pytest.raises((ValueError, FileNotFoundError), match=says): merge_command(base.replace(**{'experts': 'ex', **changes}))

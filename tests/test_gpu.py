"""CUDA-only checks of the GPU decoding path (skipped without a GPU; run on the lent H200 by `bench/gpu_suite.sh test`):
the step captured as one CUDA graph (`capture='own'`) decodes what the uncompiled loop decodes, one graph serves every
batch of a run, and fused projections keep the answers."""
import pytest
import torch

from stockdistill.generate import _pad_left, decode_greedy, encode_prompts, eos_ids, fuse_projections, generate_answers, load_student
from stockdistill.prompt import fit_prompt
from stockdistill.config import bundled_codes
from stockdistill.data import load_bars

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@pytest.fixture(scope='module')
def student():
    model, tok = load_student('tiny')        # the embedded base, float32 on the GPU
    codes = bundled_codes()
    prompts = [fit_prompt(c, load_bars(c).iloc[-40-k*50:-10-k*50], None)[0] for k in range(3) for c in codes[:4]]
    return model, tok, prompts


def greedy(model, tok, prompts, **kw):
    rows = encode_prompts(tok, prompts)
    ids, mask = _pad_left(rows, tok.pad_token_id, model.device)
    with torch.inference_mode(): return decode_greedy(model, ids, mask, 48, eos_ids(model, tok) | {tok.pad_token_id}, **kw)


def agree(a, b) -> float:
    "Share of rows whose tokens agree up to the shorter row's end (rows may stop at different looks for EOS)."
    n = min(a.shape[1], b.shape[1])
    return (a[:, :n] == b[:, :n]).all(1).float().mean().item()


def cache_keys(model) -> torch.Tensor:
    "The first layer's cached keys (a copy)."
    return model._sd_static_cache[1].layers[0].keys.clone()


@pytest.mark.parametrize('slack', [0, 64])   # a cache exactly as long as prompt + answer, or longer
def test_own_graph_fills_the_cache_as_the_eager_loop(student, slack):
    model, tok, prompts = student
    width = max(map(len, encode_prompts(tok, prompts[:2])))
    eager = greedy(model, tok, prompts[:2], cache_len=width + 48 + slack)
    keys = cache_keys(model)
    model._sd_step_graph = None                               # a first batch: the step is captured
    own = greedy(model, tok, prompts[:2], compile=True, capture='own', cache_len=width + 48 + slack)
    n = min(eager.shape[1], own.shape[1])
    same = (eager[:, :n] == own[:, :n]).all(0)
    d = n if same.all() else int((~same).nonzero()[0])      # the first step where a row's token differs (a float32 near-tie)
    filled = width + d - 1                                    # the prompt, and the input tokens of the steps before it
    assert d > n//2 and filled > width
    got = cache_keys(model)
    assert torch.equal(got[:, :, :width], keys[:, :, :width])     # the prompt: the same eager prefill, in the same slots
    diff = (got[:, :, width:filled].float() - keys[:, :, width:filled].float()).norm()/keys[:, :, width:filled].float().norm()
    assert diff < 2e-2                                        # decoded slots: inductor's kernels vs eager, bf16 rounding


def test_own_graph_decodes_what_the_eager_loop_decodes(student):
    model, tok, prompts = student
    eager = greedy(model, tok, prompts[:4])
    own = greedy(model, tok, prompts[:4], compile=True, capture='own', cache_len=1024)
    graph = model._sd_step_graph
    assert graph is not None and graph.cache is model._sd_static_cache[1]
    assert agree(eager, own) >= 0.75                         # inductor's fused kernels may flip a near-tie in float32
    trees = greedy(model, tok, prompts[:4], compile=True, capture='trees', cache_len=1024)
    assert agree(own, trees) >= 0.75                          # torch.compile's own graphs (the modes may pick other kernels)
    again = greedy(model, tok, prompts[4:8], compile=True, capture='own', cache_len=1024)   # another batch, other widths
    assert model._sd_step_graph is graph                     # captured once per run shape
    assert agree(greedy(model, tok, prompts[4:8]), again) >= 0.75


def test_fused_projections_keep_the_answers(student):
    model, tok, prompts = student
    plain = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=48, compile=True)
    stats = {}
    fused = generate_answers(model, tok, prompts, batch_size=4, max_new_tokens=48, compile=True, fuse=True, stats=stats)
    assert stats['fused'] == 2*model.config.num_hidden_layers and model._sd_step_graph is not None
    assert sum(a == b for a, b in zip(plain, fused)) >= 0.75*len(prompts)
    assert fuse_projections(model) == 0

"""How many graphs torch.compile makes of the decoding step when its first call finds the static cache not yet allocated
(the own CUDA graph's first version warmed up before the prefill) and when a prefill allocated it first (the fix).

    python bench/compile_count.py      # CPU, dynamo with its eager backend: seconds

transformers allocates a static cache layer at its first write; a compiled step that makes that first write traces the
allocation, and the next call, on an allocated cache, fails its guards and compiles again. On the H200 the first call of
the first version took 58-76 s against 33-41 s with one graph."""
import torch, tempfile, torch._dynamo
from pathlib import Path
from torch._dynamo.utils import counters
from transformers import StaticCache
from stockdistill.train import build_tiny_student
from stockdistill.generate import _decode_step, _cache_arg
prompts = ['股票 600031 近30日K线数据: 1 2 3 4 5 6 7 8 9']*4
model, tok = build_tiny_student(prompts, Path(tempfile.mkdtemp())/'m', hidden_size=64, layers=2)
model.eval()
B, S = 2, 32
for order in ('step first (old)', 'prefill first (new)'):
    torch._dynamo.reset(); counters.clear()
    step = torch.compile(_decode_step, backend='eager', fullgraph=True, dynamic=False)
    cache = StaticCache(config=model.config, max_cache_len=S)
    tok_ = torch.zeros(B, 1, dtype=torch.long); pos = torch.zeros(B, 1, dtype=torch.long)
    cpos = torch.tensor([S-1]); mask = torch.ones(B, S, dtype=torch.long)
    with torch.inference_mode():
        if order.startswith('prefill'):
            ids = torch.ones(B, 8, dtype=torch.long)
            model(input_ids=ids, position_ids=torch.arange(8).expand(B, 8), cache_position=torch.arange(8), attention_mask=mask,
                  use_cache=True, **{_cache_arg(): cache})
        for _ in range(3): step(model, tok_, pos, cpos, mask, cache)
    print(order, 'graphs compiled:', counters['stats']['unique_graphs'])

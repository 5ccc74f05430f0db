"""Training throughput of the student's LoRA / QLoRA path on a randomly initialised model of a real shape, for several
set-ups in ONE run on the same model and data.

    python bench/train_throughput.py --shape qwen1.5-7b --seq-len 2048 --steps 6      # on a GPU: every set-up
    python bench/train_throughput.py --shape tiny --seq-len 256 --steps 4 --setups previous,new   # a CPU smoke run
    accelerate launch --config_file configs/accelerate/ddp_2gpu.yaml bench/train_throughput.py --shape qwen1.5-7b \
        --setups new --folder /shared/qwen7b-random                                     # DDP on 2 GPUs

The data are like real training data: every example is a prompt (~83 % of its tokens, no loss) followed by an
answer (~17 %, the loss), with lengths spread between 80 % and 100 % of `--seq-len` (random tokens; speed does not
depend on their values). The set-ups (`SETUPS` below) are:

- `seed`      the seed's recipe: QLoRA nf4, batch 1 x gradient accumulation 4, gradient checkpointing, the loss computed
              by transformers over full-vocabulary logits of every position;
- `previous`  this project's previous default for a big student on a GPU: bf16 LoRA, batch 4, checkpointing, full logits;
- `anchor`    what a user would reach for: the previous one without checkpointing plus the HF Trainer's own
              `use_liger_kernel=True` (Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy);
- `new`       the new default (`train_student` on CUDA): checkpointing only if the memory estimate needs it, Liger's
              RMSNorm/SwiGLU/RoPE, logits only for answer positions (`answer_only_loss`), length-grouped batches, each
              LoRA layer as one autograd function (`fuse_lora`);
- `new-pack`  the same with padding-free packing (one row per batch, restarting positions);
- `new-unfused` the new default with PEFT's own LoRA forward instead of `LoraLinearFn` (`fuse_lora`);
- `new-nodrop` the new default with LoRA dropout 0 instead of the seed's 0.05 (what the dropout costs);
- `new-keep`  the new default saving the dropped-out input for the backward instead of recomputing it (`LoraLinearFn.keep_dropped`);
- `qlora-new` the new default on a 4-bit base.

Each set-up runs `--steps` optimizer steps with the same functions `train_student` uses (`load_base`, `add_lora`,
`training_arguments`, `LabelCollator`, `answer_only_loss`, `needs_checkpointing`); the first two steps are warm-up.

FLOPs per token (the MFU basis): with frozen base weights the backward pass computes activation gradients (about one
more forward, 2N) but no weight gradients, so LoRA training costs ~(2 + 2)·N = 4N per token (N = parameters in
matmuls: all but the input embedding, lm_head included), plus attention 12·L·T·d (forward and backward, causal
masking not discounted). Checkpointing's recomputation is not useful work and is not counted; neither is work that
is skipped (the answer-only head computes lm_head for ~17 % of positions, the 4N basis counts all of them, as MFU
counts model FLOPs). `hw_pct` is the share of the peak counting only the lm_head work actually done.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import torch

SHAPES = {
    'qwen1.5-7b': dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    'qwen2.5-7b': dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    'qwen2.5-32b': dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                        rms_norm_eps=1e-6, tie_word_embeddings=False),
    'tiny': dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False),
}
H200_BF16_PEAK = 989e12
ANSWER_SHARE = 0.17

SETUPS = {  # name: (4-bit, batch, grad accum, checkpointing ('auto' | bool), liger ('hf' | 'ours' | False), answer-only, pack, fused LoRA)
    'seed': (True, 1, 4, True, False, False, False, False),
    'previous': (False, 4, 1, True, False, False, False, False),
    'anchor': (False, 4, 1, False, 'hf', False, False, False),
    'new': (False, 4, 1, 'auto', 'ours', True, False, True),
    'new-unfused': (False, 4, 1, 'auto', 'ours', True, False, False),  # the new default with PEFT's own LoRA forward
    'new-pack': (False, 4, 1, 'auto', 'ours', True, True, True),
    'qlora-new': (True, 4, 1, 'auto', 'ours', True, False, True),
    'new-compile': (False, 4, 1, 'auto', False, True, False, True),    # the new default with torch.compile instead of Liger
    'new-b8': (False, 8, 1, 'auto', 'ours', True, False, True),        # twice the micro-batch (checkpointing if it would not fit)
    'new-nodrop': (False, 4, 1, 'auto', 'ours', True, False, True),    # the new default with lora_dropout 0 (what dropout costs)
    'new-keep': (False, 4, 1, 'auto', 'ours', True, False, True),      # the new default saving dropout(x) (LoraLinearFn.keep_dropped)
}
EXTRA_ARGS = {'new-compile': dict(torch_compile=True)}   # TrainingArguments beyond the tuple's
DROPOUT = {'new-nodrop': 0.0}                            # LoRA dropout where it is not the seed's 0.05

def random_model(shape:str, device=None, dtype=None):
    "A randomly initialised Qwen2 model of `shape` (bf16 on GPU, float32 on CPU), built on its device directly."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    kw = dict(SHAPES[shape]); theta = kw.pop('rope_theta', 1e4)
    cfg = Qwen2Config(**kw, rope_parameters=dict(rope_type='default', rope_theta=theta))
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    with torch.device('meta'): model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype or (torch.bfloat16 if device.type == 'cuda' else torch.float32))
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name: p.fill_(1.0)
            elif name.endswith('bias'): p.zero_()
            else: p.normal_(0, 0.02, generator=gen)
    return model, cfg

def build_random(shape:str, folder:Path):
    "Save a randomly initialised Qwen2 model of `shape` to `folder` (with a tokenizer-free config)."
    t0 = time.time()
    model, cfg = random_model(shape)
    model.save_pretrained(folder)
    n_embed = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    print(f"built {shape}: {n/1e9:.3f}B parameters ({(n - n_embed)/1e9:.3f}B in matmuls) in {time.time()-t0:.0f}s", flush=True)
    return cfg, n, n - n_embed

def count_params(cfg) -> tuple:
    "(all parameters, parameters in matmuls: all but the input embedding) of a model with `cfg`, built on 'meta'."
    from transformers import AutoModelForCausalLM
    with torch.device('meta'): model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    return n, n - model.get_input_embeddings().weight.numel()

def examples(n:int, seq_len:int, vocab:int, seed:int=0) -> list:
    "`n` prompt+answer examples of token ids, 80-100 % of `seq_len` long, ~83 % prompt (no loss) and ~17 % answer."
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(seq_len*(0.8 + 0.2*torch.rand(1, generator=g).item()))
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        p = int(L*(1 - ANSWER_SHARE))
        out.append(dict(id=str(i), input_ids=ids, labels=[-100]*p + ids[p:], length=L))
    return out

def _collator(pack:bool, answer_only:bool, pad_id:int=0):
    """A `LabelCollator` over ready token ids (the same batching code as training), without `logits_to_keep` for the HF loss;
    the new set-ups' padded batches have no attention mask, as `train_student` gives them on CUDA."""
    from stockdistill.train import LabelCollator
    class TokenCollator(LabelCollator):
        def __init__(self): self.pack, self.pad_id, self.truncated, self.mask = pack, pad_id, set(), not answer_only
        def encode(self, e): return e['input_ids'], e['labels']
        def __call__(self, batch):
            out = super().__call__(batch)
            if not answer_only: out.pop('logits_to_keep')
            return out
    return TokenCollator()

def _profiler_callback():
    "A `TrainerCallback` class that profiles the third optimizer step and prints its 25 costliest GPU kernels."
    from transformers import TrainerCallback
    class Profile(TrainerCallback):
        def __init__(self, name): self.name, self.prof, self.n = name, None, 0
        def on_step_begin(self, *a, **k):
            self.n += 1
            if self.n == 3:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]); self.prof.__enter__()
        def on_step_end(self, *a, **k):
            if self.prof is None or self.n != 3: return
            torch.cuda.synchronize(); self.prof.__exit__(None, None, None)
            print_kernels(self.prof, f"[{self.name}] profile of one step:", 25)
    return Profile

def print_kernels(prof, label:str, rows:int):
    "Print `label`, the GPU kernel time a finished `torch.profiler.profile` recorded, and its `rows` costliest kernels."
    ev = prof.key_averages()
    print(f"{label} {sum(e.self_device_time_total for e in ev)/1e3:.0f} ms of GPU kernels", flush=True)
    print(ev.table(sort_by='self_device_time_total', row_limit=rows, max_name_column_width=90), flush=True)

def run_setup(name:str, model, cfg, n_matmul:int, steps:int, seq_len:int, world:int=1, profile=()) -> dict:
    "Train `steps` optimizer steps of set-up `name` on `model` (LoRA added here and removed after); the measured figures."
    from transformers import Trainer, TrainerCallback
    from stockdistill.config import DistillConfig
    Profile = _profiler_callback()
    from stockdistill.train import LoraLinearFn, add_lora, answer_only_loss, needs_checkpointing, train_memory_gib, training_arguments
    LoraLinearFn.keep_dropped = name == 'new-keep'
    four_bit, batch, accum, ckpt, liger, answer_only, pack, fused = SETUPS[name]
    cuda = torch.cuda.is_available()
    if not cuda: liger = False                                 # Liger's kernels are Triton: GPU only
    if ckpt == 'auto': ckpt = needs_checkpointing(model, batch*seq_len, liger=bool(liger)) if cuda else False
    est = train_memory_gib(model, batch*seq_len, ckpt, bool(liger), ANSWER_SHARE if answer_only else 1.0)
    dc = DistillConfig(student='bench', batch_size=batch, grad_accum=accum, max_steps=steps, lr=1e-4, lora_r=8, lora_alpha=32,
                       lora_dropout=DROPOUT.get(name, 0.05), epochs=1.0, liger=False)
    peft = add_lora(model, dc.lora_r, dc.lora_alpha, dc.lora_dropout, dc.target_modules, gradient_checkpointing=ckpt, fused=fused)
    data = examples(steps*batch*accum*world, seq_len, cfg.vocab_size)   # a list: the sampler reads len(input_ids)
    times = []
    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda: torch.cuda.synchronize()
            self.t = time.time()
        def on_step_end(self, *a, **k):
            if cuda: torch.cuda.synchronize()
            times.append(time.time() - self.t)
    callbacks = [Clock()] + ([Profile(name)] if name in profile else [])
    if cuda: torch.cuda.reset_peak_memory_stats(); torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(dc, out, save_strategy='no', logging_steps=max(1, steps//2), ddp_find_unused_parameters=False,
                                  group_by_length=not pack and batch > 1, use_liger_kernel=bool(liger),
                                  liger_kernel_config=None if liger == 'hf' else dict(rope=True, swiglu=True, rms_norm=True,
                                  cross_entropy=False, fused_linear_cross_entropy=False) if liger else None,
                                  **EXTRA_ARGS.get(name, {}))
        trainer = Trainer(model=peft, args=args, train_dataset=data, data_collator=_collator(pack, answer_only),
                          callbacks=callbacks, **(dict(compute_loss_func=answer_only_loss) if answer_only else {}))
        t0 = time.time()
        trainer.train()
        wall = time.time() - t0
    timed = times[2:] if len(times) > 3 else times[1:] or times     # skip warm-up steps
    step_s = sorted(timed)[len(timed)//2]
    tok_step = sum(e['length'] for e in data[:batch*accum*world])   # real tokens of one optimizer step
    tps = tok_step/step_s
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    attn = 12*L*seq_len*d
    head = d*V                                                 # lm_head parameters, part of n_matmul
    model_flops = (4*n_matmul + attn)*tps/world
    hw_flops = (4*(n_matmul - head) + 4*head*(ANSWER_SHARE if answer_only else 1.0) + attn)*tps/world
    peak = torch.cuda.max_memory_allocated()/2**30 if cuda else float('nan')
    res = dict(setup=name, four_bit=four_bit, batch=batch, grad_accum=accum, checkpointing=bool(ckpt), liger=liger,
               answer_only=answer_only, pack=pack, fused=fused, gpus=world, tokens_per_step=tok_step, step_s=round(step_s, 3),
               tokens_per_s=round(tps, 1), tokens_per_s_per_gpu=round(tps/world, 1), mfu_4N_pct=round(100*model_flops/H200_BF16_PEAK, 2),
               hw_pct=round(100*hw_flops/H200_BF16_PEAK, 2), peak_gpu_gib=round(peak, 2), estimated_gib=round(est, 1),
               wall_s=round(wall, 1), device=torch.cuda.get_device_name() if cuda else 'cpu')
    model = peft.unload()                                      # the bare base back, for the next set-up
    if ckpt: model.gradient_checkpointing_disable()
    del trainer, peft
    gc.collect()
    if cuda: torch.cuda.empty_cache()
    return res, model

def run_group(folder:Path, setups:list, steps:int, seq_len:int, profile=(), warm:bool=True) -> list:
    "Load the base once (4-bit or bf16, as the set-ups need) and run `setups` on it in order."
    from transformers import AutoConfig
    from stockdistill.generate import load_base
    from accelerate import PartialState
    state = PartialState()
    cfg = AutoConfig.from_pretrained(folder)
    n, n_matmul = count_params(cfg)
    t0 = time.time()
    model = load_base(str(folder), load_in_4bit=SETUPS[setups[0]][0])
    if torch.cuda.is_available() and not SETUPS[setups[0]][0]: model.to(f'cuda:{state.local_process_index}')
    print(f"loaded {folder.name} ({'4-bit' if SETUPS[setups[0]][0] else 'bf16'}) in {time.time() - t0:.0f}s", flush=True)
    if warm:   # the first set-up of a process ran 12-20 % slower than later in it (see `--warm`): run it once untimed
        model = run_setup(setups[0], model, cfg, n_matmul, steps, seq_len, state.num_processes, ())[1]
    out = []
    for name in setups:
        r, model = run_setup(name, model, cfg, n_matmul, steps, seq_len, state.num_processes, profile)
        out.append(r)
        if state.is_main_process:
            print(f"[{name}] {r['tokens_per_s']:.0f} tokens/s ({r['step_s']} s/step of {r['tokens_per_step']} tokens), "
                  f"MFU {r['mfu_4N_pct']}% (4N basis; {r['hw_pct']}% of work done), peak {r['peak_gpu_gib']} GiB "
                  f"(estimated {r['estimated_gib']}), checkpointing {r['checkpointing']}", flush=True)
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', choices=list(SHAPES), default='tiny')
    p.add_argument('--setups', default=','.join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    p.add_argument('--steps', type=int, default=12, help='optimizer steps per set-up (the first 2 are warm-up; 3 timed steps read 42.9 %% MFU where 10 read 49.5 %%)')
    p.add_argument('--seq-len', type=int, default=2048, help='the longest example; examples are 80-100 %% of it')
    p.add_argument('--folder', default=None, help='where to save the random model (default: a temporary folder)')
    p.add_argument('--json', default=None, help='also write the results to this file')
    p.add_argument('--profile', default='', help='comma-separated set-ups whose third step is profiled (GPU kernels table)')
    p.add_argument('--warm', type=int, default=1, help="run each process's first set-up once untimed first (1) or not (0). On the "
                   "H200 the first set-up of a process ran 12-20 %% slower than the same set-up after another (new: 35.6 %% MFU "
                   "first, 46.5 %% second), which made the order of --setups decide comparisons")
    p.add_argument('--group', default=None, help=argparse.SUPPRESS)   # internal: run one load group in this process
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): torch.set_num_threads(os.cpu_count() or 1)
    setups = [s for s in a.setups.split(',') if s]
    if bad := [s for s in setups if s not in SETUPS]: p.error(f"unknown set-up(s) {bad}: use {', '.join(SETUPS)}")
    if a.group:   # a child process: one base, several set-ups
        res = run_group(Path(a.folder), setups, a.steps, a.seq_len, a.profile.split(','), bool(a.warm))
        Path(a.json).write_text(json.dumps(res))
        return res
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.folder or Path(tmp)/a.shape)
        if not (folder/'config.json').exists(): build_random(a.shape, folder)
        # each base in its own process: Liger patches transformers' classes, and a 4-bit and a bf16 copy need not coexist
        groups = [[s for s in setups if SETUPS[s][0]], [s for s in setups if not SETUPS[s][0]]]
        groups = [sorted(g, key=lambda s: SETUPS[s][4] == 'hf') for g in groups if g]   # HF's Liger (class patches) last
        results = []
        for g in groups:
            js = Path(tmp)/f"group{len(results)}.json"
            cmd = [sys.executable, __file__, '--group', '1', '--folder', str(folder), '--setups', ','.join(g),
                   '--steps', str(a.steps), '--seq-len', str(a.seq_len), '--shape', a.shape, '--json', str(js), '--profile', a.profile,
                   '--warm', str(a.warm)]
            r = subprocess.run(cmd)
            if r.returncode == 0: results += json.loads(js.read_text())
            else: print(f"set-ups {g} failed (exit {r.returncode})", flush=True)
    print(f"\n{'set-up':10s} {'tokens/s':>9s} {'MFU 4N':>7s} {'work':>6s} {'peak GiB':>9s} {'est.':>6s}  ckpt liger answer-only pack fused")
    for r in results:
        print(f"{r['setup']:10s} {r['tokens_per_s']:9.0f} {r['mfu_4N_pct']:6.1f}% {r['hw_pct']:5.1f}% {r['peak_gpu_gib']:9.1f} "
              f"{r['estimated_gib']:6.1f}  {str(r['checkpointing']):5s} {str(r['liger']):5s} {str(r['answer_only']):11s} {str(r['pack']):5s} {r['fused']}")
    if a.json: Path(a.json).write_text(json.dumps(results, indent=2))
    return results

if __name__ == '__main__': main()

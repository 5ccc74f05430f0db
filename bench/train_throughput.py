"""Training throughput of the student's LoRA / QLoRA path on a randomly initialised model of a real shape.

    python bench/train_throughput.py --shape qwen1.5-7b --mode both --steps 8 --seq-len 2048   # on a GPU
    python bench/train_throughput.py --shape tiny --mode both --steps 4 --seq-len 256          # on a CPU
    accelerate launch --config_file configs/accelerate/ddp_2gpu.yaml bench/train_throughput.py --shape qwen1.5-7b \
        --mode both --steps 8 --seq-len 2048 --batch 4                                          # DDP on 2 GPUs

The model is built at random with the exact config (Qwen1.5-7B is the Qwen2 architecture), saved to a local folder,
and loaded back with `stockdistill.generate.load_base` (bitsandbytes quantises on load), then wrapped by `add_lora` and
trained by the HF `Trainer` with `training_arguments`: the same functions `train_student` uses. Prints tokens/s,
peak GPU memory and the share of the GPU's dense bf16 peak (989 TFLOP/s for an H200 SXM).

FLOPs per token: with frozen base weights, the backward pass still computes activation gradients (about one more
forward, 2N) but no weight gradients, so LoRA training costs ~(2 + 2)·N = 4N per token (N = parameters in matmuls,
i.e. all but the input embedding), plus attention 2·2·L·T·d forward and twice that backward (we count 12·L·T·d in
total, causal masking not discounted). Gradient checkpointing recomputes the forward (another 2N) but that is not
useful work, so it is not counted. The usual full fine-tuning figure 6N is printed as well.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path
import torch

SHAPES = {
    'qwen1.5-7b': dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    'tiny': dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False),
}
H200_BF16_PEAK = 989e12

def random_model(shape:str, device=None):
    "A randomly initialised Qwen2 model of `shape` (bf16 on GPU, float32 on CPU), built on its device directly."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    kw = dict(SHAPES[shape]); theta = kw.pop('rope_theta', 1e4)
    cfg = Qwen2Config(**kw, rope_parameters=dict(rope_type='default', rope_theta=theta))
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    with torch.device('meta'): model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16 if device.type == 'cuda' else torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name: p.fill_(1.0)
            elif name.endswith('bias'): p.zero_()
            else: p.normal_(0, 0.02, generator=gen)
    return model, cfg

def build_random(shape:str, folder:Path):
    "Save a randomly initialised Qwen2 model of `shape` to `folder`."
    t0 = time.time()
    model, cfg = random_model(shape)
    model.save_pretrained(folder)
    n_embed = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available(): torch.cuda.empty_cache()
    print(f"built {shape}: {n/1e9:.3f}B parameters ({(n - n_embed)/1e9:.3f}B in matmuls) in {time.time()-t0:.0f}s")
    return cfg, n, n - n_embed

def count_params(cfg) -> tuple:
    "(all parameters, parameters in matmuls: all but the input embedding) of a model with `cfg`, built on 'meta'."
    from transformers import AutoModelForCausalLM
    with torch.device('meta'): model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    return n, n - model.get_input_embeddings().weight.numel()

class RandomTokens(torch.utils.data.Dataset):
    "Fixed-length random token rows (every token is a label)."
    def __init__(self, n, seq_len, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    def __len__(self): return len(self.ids)
    def __getitem__(self, i): return dict(input_ids=self.ids[i], labels=self.ids[i])

def run(folder:Path, cfg, n_matmul:int, mode:str, steps:int, seq_len:int, batch:int, grad_accum:int, gc:bool,
        world:int=1):
    "Train `steps` optimizer steps with the student's LoRA/QLoRA path; return the measured figures."
    from transformers import Trainer, TrainerCallback
    from stockdistill.config import DistillConfig
    from stockdistill.generate import load_base
    from stockdistill.train import add_lora, resolve_training, training_arguments
    cuda = torch.cuda.is_available()
    if cuda: torch.cuda.reset_peak_memory_stats(); torch.cuda.empty_cache()
    dc = resolve_training(DistillConfig(student=str(folder), load_in_4bit=mode == 'qlora', batch_size=batch,
                                        grad_accum=grad_accum, max_steps=steps, lr=1e-4))
    t0 = time.time()
    model = load_base(str(folder), load_in_4bit=dc.load_in_4bit)
    load_s = time.time() - t0
    model = add_lora(model, dc.lora_r, dc.lora_alpha, dc.lora_dropout, dc.target_modules, gradient_checkpointing=gc)
    trainable, total = model.get_nb_trainable_parameters()
    times = []
    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda: torch.cuda.synchronize()
            self.t = time.time()
        def on_step_end(self, *a, **k):
            if cuda: torch.cuda.synchronize()
            times.append(time.time() - self.t)
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(dc, out, save_strategy='no', logging_steps=max(1, steps//4),
                                  ddp_find_unused_parameters=False)
        data = RandomTokens(steps*batch*grad_accum, seq_len, cfg.vocab_size)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
        trainer.train()
    timed = times[2:] if len(times) > 3 else times[1:] or times     # skip warm-up steps
    step_s = sorted(timed)[len(timed)//2]
    tokens = batch*grad_accum*seq_len*world
    tps = tokens/step_s
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    attn = 12*L*seq_len*d
    lora_flops, full_flops = (4*n_matmul + attn)*tps, (6*n_matmul + attn)*tps
    peak = torch.cuda.max_memory_allocated()/2**30 if cuda else float('nan')
    lora_flops, full_flops = lora_flops/world, full_flops/world     # per GPU, against one GPU's peak
    res = dict(mode=mode, device=torch.cuda.get_device_name() if cuda else 'cpu', gpus=world, load_s=round(load_s, 1),
               tokens_per_s_per_gpu=round(tps/world, 1),
               steps=len(times), step_s=round(step_s, 3), tokens_per_step=tokens, tokens_per_s=round(tps, 1),
               peak_gpu_gib=round(peak, 2), trainable_params=trainable, total_params=total,
               tflops_4N=round(lora_flops/1e12, 4), tflops_6N=round(full_flops/1e12, 4),
               mfu_4N_pct=round(100*lora_flops/H200_BF16_PEAK, 3), mfu_6N_pct=round(100*full_flops/H200_BF16_PEAK, 3),
               gradient_checkpointing=gc, seq_len=seq_len, batch=batch, grad_accum=grad_accum)
    del trainer, model
    if cuda: torch.cuda.empty_cache()
    return res

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', choices=list(SHAPES), default='tiny')
    p.add_argument('--mode', choices=['qlora', 'lora', 'both'], default='both')
    p.add_argument('--steps', type=int, default=6, help='optimizer steps per mode (the first 2 are warm-up)')
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--grad-accum', type=int, default=1)
    p.add_argument('--no-gc', action='store_true', help='turn gradient checkpointing off')
    p.add_argument('--folder', default=None, help='where to save the random model (default: a temporary folder)')
    p.add_argument('--json', default=None, help='also write the results to this file')
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): torch.set_num_threads(os.cpu_count() or 1)
    modes = ['qlora', 'lora'] if a.mode == 'both' else [a.mode]
    from accelerate import PartialState
    state = PartialState()                      # one process, or one per GPU under accelerate launch
    world, main = state.num_processes, state.is_main_process
    if a.folder is None and world > 1: raise SystemExit("give --folder (a path every process can read) with several processes")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.folder or Path(tmp)/a.shape)
        if main: build_random(a.shape, folder)
        state.wait_for_everyone()
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(folder)
        n, n_matmul = count_params(cfg)
        results = []
        for mode in modes:
            r = run(folder, cfg, n_matmul, mode, a.steps, a.seq_len, a.batch, a.grad_accum, not a.no_gc, world)
            results.append(r)
            if not main: continue
            print(f"[{a.shape} {mode} x{world} GPU] {r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_s_per_gpu']:.1f} per GPU "
                  f"({r['step_s']}s/step of {r['tokens_per_step']} tokens), "
                  f"peak GPU memory {r['peak_gpu_gib']} GiB, {r['tflops_4N']} TFLOP/s (4N+attn) = {r['mfu_4N_pct']}% "
                  f"of 989 TFLOP/s bf16; 6N figure {r['tflops_6N']} TFLOP/s = {r['mfu_6N_pct']}%; "
                  f"trainable {r['trainable_params']:,} of {r['total_params']:,}", flush=True)
    if not main: return results
    if a.json: Path(a.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return results

if __name__ == '__main__': main()

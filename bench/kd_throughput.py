"""Throughput and peak memory of logit distillation's two ways of getting the teacher's distribution (issue #16):

- online:  the teacher model sits in GPU memory next to the student and runs a forward pass (no gradients) on every
           batch; the student learns from the teacher's full distribution at the answer positions;
- offline: the teacher ran once beforehand and stored its top-k log-probabilities per answer token; the student
           learns from those (renormalised over the k tokens), and the teacher need not be in memory.

    python bench/kd_throughput.py --teacher qwen2.5-32b --student qwen2.5-7b --seq-len 2048 --batch 2   # on an H200
    python bench/kd_throughput.py --teacher tiny --student tiny --seq-len 256 --steps 3                  # CPU smoke run

Both are random models of the real shapes (bf16); the student is a LoRA (bf16 base) trained with the project's
`add_lora`. The loss is the forward KL KL(p_teacher,T || p_student,T)·T² at answer positions only (~17 % of the
tokens, as in real data), the loss `stockdistill`'s KD method uses; its cost is small beside the two forwards. It
also times the teacher pass that writes the offline file (top-k extraction per answer token) in tokens/s.
"""
import argparse
import gc
import json
import time
from pathlib import Path
import torch
import torch.nn.functional as F
from train_throughput import SHAPES, ANSWER_SHARE, random_model, count_params

def batch_of(b:int, seq:int, vocab:int, g):
    "Random token rows with the last ~17 % of each row as answer (the only positions whose logits are used)."
    ids = torch.randint(3, vocab, (b, seq), generator=g)
    keep = torch.zeros(b, seq, dtype=torch.bool); keep[:, int(seq*(1 - ANSWER_SHARE)):-1] = True
    return ids, keep

def kd_loss_full(s_logits, t_logits, T:float=1.0):
    "Forward KL(p_t || p_s) at temperature T, times T², mean over positions (full vocabulary)."
    t = F.log_softmax(t_logits.float()/T, -1); s = F.log_softmax(s_logits.float()/T, -1)
    return (t.exp()*(t - s)).sum(-1).mean()*T*T

def kd_loss_topk(s_logits, t_top_lp, t_top_idx, T:float=1.0):
    "Forward KL over the teacher's top-k tokens (teacher log-probs renormalised over them), times T²."
    t = F.log_softmax(t_top_lp.float()/T, -1)
    s = F.log_softmax(s_logits.float()/T, -1).gather(-1, t_top_idx)
    return (t.exp()*(t - s)).sum(-1).mean()*T*T

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--teacher', choices=list(SHAPES), default='tiny')
    p.add_argument('--student', choices=list(SHAPES), default='tiny')
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--steps', type=int, default=5, help='steps per way (the first 2 are warm-up)')
    p.add_argument('--top-k', type=int, default=20)
    p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = 'cuda' if cuda else 'cpu'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from stockdistill.train import add_lora
    teacher, tcfg = random_model(a.teacher); teacher.eval().requires_grad_(False)
    models = dict(teacher=teacher); del teacher
    student, scfg = random_model(a.student)
    if tcfg.vocab_size != scfg.vocab_size:   # the shapes share Qwen's vocabulary except the 151,936/152,064 rounding
        V = min(tcfg.vocab_size, scfg.vocab_size)
    else: V = scfg.vocab_size
    student = add_lora(student, 16, 32, 0.0, gradient_checkpointing=True)
    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=1e-4)
    _, n_s = count_params(scfg); _, n_t = count_params(tcfg)
    g = torch.Generator().manual_seed(0)
    res = {}
    def measure(name, step):
        times = []
        if cuda: torch.cuda.reset_peak_memory_stats()
        for i in range(a.steps):
            ids, keep = batch_of(a.batch, a.seq_len, V, g)
            sync(); t0 = time.time(); step(ids.to(dev), keep.to(dev)); sync(); times.append(time.time() - t0)
        st = sorted(times[2:] or times)[len(times[2:] or times)//2]
        tok = a.batch*a.seq_len
        peak = torch.cuda.max_memory_allocated()/2**30 if cuda else float('nan')
        res[name] = dict(tokens_per_s=round(tok/st, 1), step_s=round(st, 3), peak_gib=round(peak, 1))
        print(f"[{name}] {tok/st:8.0f} tokens/s ({st:.3f} s/step of {tok} tokens), peak {peak:.1f} GiB", flush=True)

    def online(ids, keep):
        with torch.no_grad(): t_logits = models['teacher'](input_ids=ids, logits_to_keep=keep).logits[..., :V]
        s_logits = student(input_ids=ids, logits_to_keep=keep).logits[..., :V]
        loss = kd_loss_full(s_logits, t_logits); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    measure('online (teacher in memory, full distribution)', online)

    store = {}
    def teacher_pass(ids, keep):
        with torch.no_grad():
            lp = F.log_softmax(models['teacher'](input_ids=ids, logits_to_keep=keep).logits[..., :V].float(), -1)
            top = lp.topk(a.top_k, -1)
            store['lp'], store['idx'] = top.values.to(torch.bfloat16), top.indices.to(torch.int32)
    measure(f'teacher pass writing top-{a.top_k} log-probs (offline file)', teacher_pass)
    del models['teacher']; gc.collect()
    if cuda: torch.cuda.empty_cache()

    def offline(ids, keep):
        s_logits = student(input_ids=ids, logits_to_keep=keep).logits[..., :V]
        loss = kd_loss_topk(s_logits, store['lp'][:s_logits.shape[0]], store['idx'][:s_logits.shape[0]].long())
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    measure(f'offline top-{a.top_k} (teacher not in memory)', offline)
    per_tok = a.top_k*(2 + 4)                # bf16 log-prob + int32 token id per stored entry
    print(f"offline file: {per_tok} bytes per answer token ({per_tok*ANSWER_SHARE*a.seq_len/1024:.1f} KiB per {a.seq_len}-token "
          f"example); student {n_s/1e9:.2f}B, teacher {n_t/1e9:.2f}B matmul parameters on {torch.cuda.get_device_name() if cuda else 'cpu'}")
    res['bytes_per_answer_token'] = per_tok
    if a.json: Path(a.json).write_text(json.dumps(res, indent=2))
    return res

if __name__ == '__main__': main()

"""README's CPU experiment in a plain PyTorch loop: nanoGPT's loop plus four `QuantSession` calls.

    ALTGRAD_TINYSHAKESPEARE=/path/to/input.txt python recipes/plain_loop.py [--recipe fp8_hybrid]
        [--max-steps 2000] [--shadow-every 10] [--out out/plain_loop]

No Trainer, no accelerate: torch and altgrad only. Same model, data, recipe, FP32 shadow and alerts as
`recipes/train.py`; `tests/test_session.py` checks that for the same batches it reproduces
`AltGradTrainer`'s losses bit for bit.
"""

import argparse
import math
import os

import torch

from altgrad.data import DataConfig, prepare_data
from altgrad.modeling import GPT, GPTConfig
from altgrad.monitoring.console import format_log_line
from altgrad.monitoring.metrics import MetricsFile
from altgrad.training import QuantSession

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--recipe", default="fp8_hybrid")
p.add_argument("--max-steps", type=int, default=2000)
p.add_argument("--shadow-every", type=int, default=10)
p.add_argument("--out", default="out/plain_loop")
a = p.parse_args()

# nanoGPT's CPU Shakespeare-char settings (recipes/configs/cpu_shakespeare_char.yaml)
batch_size, block_size, log_every, eval_every = 12, 64, 10, 250
lr, min_lr, warmup = 1e-3, 1e-4, 100
torch.manual_seed(1337)
data = prepare_data(DataConfig(source="shakespeare_char", max_eval_blocks=240), block_size,
                    num_train_samples=a.max_steps * batch_size)
model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=block_size, vocab_size=data.vocab_size))
session = QuantSession(model, a.recipe, shadow_every=a.shadow_every, log_every=log_every, output_dir=a.out)
optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=lr, betas=(0.9, 0.99), device_type="cpu")
metrics_file = MetricsFile(a.out)
os.makedirs(a.out, exist_ok=True)


def lr_at(step):  # nanoGPT: linear warmup, cosine decay to min_lr
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (a.max_steps - warmup))) * (lr - min_lr)


@torch.no_grad()
def evaluate():
    model.eval()
    loader = torch.utils.data.DataLoader(data.eval_dataset, batch_size=batch_size)
    losses = [model(**batch).loss for batch in loader]
    model.train()
    return torch.stack(losses).mean().item()


model.train()
train_loader = torch.utils.data.DataLoader(data.train_dataset, batch_size=batch_size)  # random windows
for step, batch in zip(range(a.max_steps), train_loader):
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
    session.begin_step()                                    # 1. scales roll, shadow syncs, stats on log steps
    loss = session.forward_backward(batch)                  # 2. forward/backward (+ the FP32 shadow's)
    verdict = session.before_optimizer_step()               # 3. weight-grad rounding, NaN check, shadow compare
    if verdict.ok:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    elif verdict.stop:
        print(verdict.message)
        break
    optimizer.zero_grad(set_to_none=True)
    logs = session.end_step(loss, learning_rate=lr_at(step))  # 4. stored weights, bit-stall, metrics
    if logs is not None:
        metrics_file.write(session.step, logs)
        print(format_log_line(logs, session.step, a.max_steps), flush=True)
    if session.step % eval_every == 0 or session.step == a.max_steps:
        print(format_log_line({"eval_loss": evaluate()}, session.step), flush=True)
model.save_pretrained(a.out)
data.tokenizer.save_pretrained(a.out)

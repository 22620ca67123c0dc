r"""Training-step throughput of PyTorch eager peers of three ssl_jax recipes, on CPU (issue 15).

Runs in its own virtual environment with torch and kornia, never in the
project's (torch is not a dependency of ssl_jax; see
benchmarks/simclr_torch_reference.py for the venv):

  /work/torchvenv/bin/python benchmarks/torch_peers.py --workload {gpt,simclr,mae} \
      [--warmup 3] [--steps 10] [--threads N] [--vocab 1024]

Each workload builds the model and optimizer as the peer's authors do, runs
`--warmup` untimed steps (eager PyTorch has nothing to compile, but the first
steps allocate), then times `--steps` full training steps with
time.perf_counter: batch -> forward -> loss -> backward -> optimizer step. It
prints a small table and, as the LAST stdout line, a JSON object (workload,
steps, step_time_s = median, step_time_p10_s, step_time_p90_s, examples_per_s,
tokens_per_s for gpt, torch_version, num_threads, ...). Float32 throughout: on
a CPU nanoGPT autocasts nothing (train.py L73 picks bf16 only with CUDA) and
MAE's torch.cuda.amp.autocast (engine_pretrain.py L47) is a no-op.

Input data are random, which is all a throughput needs: random token ids for
gpt, random images for simclr and mae. Line numbers are of karpathy/nanoGPT at
3adf61e and facebookresearch/mae at efb2a80.

gpt: nanoGPT's CPU recipe (README L85: config/train_shakespeare_char.py with
  --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
  --dropout=0.0), with --vocab tokens (default 1024: configs/gpt.py:local's BPE;
  nanoGPT's characters are 65). The model is nanoGPT's model.py: L18-27
  LayerNorm with optional bias; L29-76 CausalSelfAttention with
  F.scaled_dot_product_attention(is_causal=True) (L64); L78-92 MLP 4x with exact
  nn.GELU(); L94-106 pre-LN Block; L118-145 GPT with learned positions, weight
  tying (L138), N(0, 0.02) init and the scaled c_proj init (L143-145); L184-187
  the loss over every position. train.py L56 bias=False (not overridden by the
  CPU command). Optimizer: model.py L263-287 configure_optimizers (decay on
  >= 2-D parameters only; fused AdamW only on CUDA, so not here) with
  train_shakespeare_char.py L27 lr 1e-3, L31 beta2 0.99, train.py L60 weight
  decay 0.1, L61 beta1 0.9; train.py L306-314 clip to norm 1.0 (L63), step,
  zero_grad(set_to_none=True); L323 loss.item() every step (log_interval=1).
  The batch is drawn inside the step (train.py L303 fetches it there too).
  nanoGPT's per-iteration cosine lr (a float set per group) is left out.

simclr: benchmarks/simclr_torch_reference.py's model and recipe, imported from
  it (ResNet18 width 16 with the CIFAR stem, Projection 128 -> 512 -> 128,
  ntxent with temperature 0.5, SGD momentum 0.9 lr 0.12, weight decay 5e-4 on
  kernels only, batch 256, both views in one forward pass), and its kornia
  views on the batch: RandomResizedCrop(0.08, 1) + flip + ColorJitter(0.4, 0.4,
  0.4, 0.1, p 0.8) + RandomGrayscale(0.2), then normalisation. The augmentation
  runs INSIDE the timed step, as ssl_jax's SimCLR step augments on device.
  Its LambdaLR cosine (a float per step) is left out.

mae: facebookresearch/mae models_mae.py L22-220 MaskedAutoencoderViT at
  configs/mae_vit.py:local's size on 32 px RGB: patch 4 (64 patches), encoder 4
  blocks of width 128, 4 heads, MLP 256; decoder width 64, 2 blocks, 4 heads,
  MLP 128; LayerNorm eps 1e-6 (L227). timm's Block (not installed here) is
  written out: pre-LN attention with a qkv bias (L40) via
  F.scaled_dot_product_attention (timm's fused_attn) and an exact-GELU MLP.
  Fixed 2-D sin-cos positions with a zero cls row (L68-72, util/pos_embed.py
  L20-67), xavier-uniform Linear and patch-embedding init, N(0, 0.02) cls and
  mask tokens (L74-93); random_masking by argsort of uniform noise (L123-148),
  mask ratio 0.75; decoder unshuffle by gather (L172-196); norm_pix_loss on
  the masked patches (L198-214; main_pretrain.py --norm_pix_loss, as the paper
  runs). Optimizer: main_pretrain.py L179-180, timm's add_weight_decay (no decay
  on biases and 1-D parameters) with weight decay 0.05, AdamW betas (0.9, 0.95),
  lr 2e-3 (mae_vit.py:local); no gradient clipping (NativeScaler's default).
  MAE augments (RandomResizedCrop + flip) in DataLoader workers, outside the
  step: by default the batch is a random slice of pre-normalised images.
  With --images NPZ (uint8 images, as ssl_jax's side reads) the batch comes
  from the reference's DataLoader instead (benchmarks/torch_mae_data.py),
  fetched inside the timed step as ssl_jax's bench fetches its own.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import simclr_torch_reference as simclr_ref  # noqa: E402  (its main() is guarded)
import torch_mae_data  # noqa: E402


class LayerNorm(nn.Module):
  """nanoGPT model.py L18-27: LayerNorm with an optional bias, eps 1e-5."""

  def __init__(self, dim: int, bias: bool):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
  """Fused-qkv multi-head attention (nanoGPT L29-76; timm's Attention for MAE)."""

  def __init__(self, dim: int, heads: int, bias: bool, causal: bool):
    super().__init__()
    self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)
    self.heads, self.causal = heads, causal

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
               for z in self.qkv(x).split(c, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
    return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
  """Pre-LN transformer block: nanoGPT L94-106 (bias option) and timm's ViT Block (MAE)."""

  def __init__(self, dim: int, heads: int, mlp: int, bias: bool, causal: bool, norm):
    super().__init__()
    self.ln_1, self.ln_2 = norm(dim), norm(dim)
    self.attn = Attention(dim, heads, bias, causal)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp, bias=bias), nn.GELU(),
                             nn.Linear(mlp, dim, bias=bias))

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """nanoGPT model.py L118-193: learned positions, tied lm_head, GPT-2 init."""

  def __init__(self, vocab: int, block_size: int, layers: int, heads: int, width: int,
               bias: bool = False):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block_size, width)
    self.h = nn.ModuleList([Block(width, heads, 4 * width, bias, True,
                                  lambda d: LayerNorm(d, bias)) for _ in range(layers)])
    self.ln_f = LayerNorm(width, bias)
    self.lm_head = nn.Linear(width, vocab, bias=False)
    self.wte.weight = self.lm_head.weight  # L138 weight tying.
    for m in self.modules():  # L162-168
      if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, 'bias', None) is not None:
          nn.init.zeros_(m.bias)
    for name, p in self.named_parameters():  # L143-145: residual projections.
      if name.endswith(('attn.proj.weight', 'mlp.2.weight')):
        nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

  def forward(self, idx, targets):
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
    for block in self.h:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def gpt_workload(args):
  """nanoGPT's CPU recipe; returns (step, examples a step, tokens a step)."""
  batch, block = 12, 64
  model = GPT(args.vocab, block, layers=4, heads=4, width=128)
  params = [p for p in model.parameters() if p.requires_grad]  # configure_optimizers L263-287
  groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': 0.1},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))

  def step():
    data = torch.randint(args.vocab, (batch, block + 1))  # train.py get_batch: x, y shifted.
    loss = model(data[:, :-1].contiguous(), data[:, 1:].contiguous())
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  return step, batch, batch * block


def simclr_workload(args):
  """simclr_torch_reference.py's recipe with kornia views in the step."""
  import kornia.augmentation as K
  batch, size = 256, 32
  images = torch.rand(args.pool, 3, size, size)  # The reference's train01: floats in [0, 1].
  mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
  std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
  augment = nn.Sequential(K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
                          K.RandomHorizontalFlip(), K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
                          K.RandomGrayscale(p=0.2))
  encoder = simclr_ref.ResNet18(16)
  projector = simclr_ref.Projection(encoder.num_features, 512, 128)
  params = list(encoder.parameters()) + [p for p in projector.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': 5e-4},
            {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}]
  optimizer = torch.optim.SGD(groups, lr=0.12, momentum=0.9)

  def step():
    x = images[torch.randint(args.pool, (batch,))]
    v1, v2 = (augment(x) - mean) / std, (augment(x) - mean) / std
    z = projector(encoder(torch.cat([v1, v2])))
    loss = simclr_ref.ntxent(z[:batch], z[batch:], 0.5)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  return step, batch, None


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
  """mae util/pos_embed.py L20-67 with the cls row (zeros) first: (1, 1 + grid**2, dim)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)
  emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return torch.from_numpy(emb).float().unsqueeze(0)


class MAE(nn.Module):
  """mae models_mae.py MaskedAutoencoderViT (L22-220), norm_pix_loss on."""

  def __init__(self, size=32, patch=4, chans=3, width=128, depth=4, heads=4, mlp=256,
               dec_width=64, dec_depth=2, dec_heads=4, dec_mlp=128):
    super().__init__()
    norm = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731  (L227 partial(nn.LayerNorm))
    self.patch, grid = patch, size // patch
    self.patch_embed = nn.Conv2d(chans, width, patch, patch)
    self.cls_token, self.mask_token = (nn.Parameter(torch.zeros(1, 1, d)) for d in (width,
                                                                                      dec_width))
    self.register_buffer('pos_embed', sincos_2d(width, grid))  # requires_grad=False, L37
    self.register_buffer('decoder_pos_embed', sincos_2d(dec_width, grid))
    self.blocks = nn.ModuleList([Block(width, heads, mlp, True, False, norm)
                                 for _ in range(depth)])
    self.norm, self.decoder_norm = norm(width), norm(dec_width)
    self.decoder_embed = nn.Linear(width, dec_width)
    self.decoder_blocks = nn.ModuleList([Block(dec_width, dec_heads, dec_mlp, True, False, norm)
                                         for _ in range(dec_depth)])
    self.decoder_pred = nn.Linear(dec_width, patch**2 * chans)
    w = self.patch_embed.weight.data  # L74-93
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.normal_(self.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, imgs, mask_ratio=0.75):
    x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    n, length, d = x.shape  # random_masking, L123-148
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(torch.rand(n, length), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))  # forward_decoder, L172-196
    tokens = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    p, h = self.patch, imgs.shape[2] // self.patch  # patchify L95-107, forward_loss L198-214
    target = torch.einsum('nchpwq->nhwpqc', imgs.reshape(n, 3, h, p, h, p)).reshape(n, h * h, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                          + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def mae_workload(args):
  """MAE at configs/mae_vit.py:local's size on 32 px RGB, batch 128."""
  batch = 128
  images = (torch.rand(args.pool, 3, 32, 32) - 0.5) / 0.5  # Already normalised, as a loader.
  batches = torch_mae_data.reference_batches(args.images, batch) if args.images else None
  model = MAE()
  decay, no_decay = [], []  # timm add_weight_decay (main_pretrain.py L179).
  for name, p in model.named_parameters():
    (no_decay if p.ndim <= 1 or name.endswith('.bias') else decay).append(p)
  optimizer = torch.optim.AdamW([{'params': no_decay, 'weight_decay': 0.0},
                                 {'params': decay, 'weight_decay': 0.05}],
                                lr=2e-3, betas=(0.9, 0.95))

  def step():
    inputs = next(batches) if batches else images[torch.randint(args.pool, (batch,))]
    loss = model(inputs, mask_ratio=0.75)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()

  return step, batch, None


def autocast(step, dtype):
  """`step` under CPU autocast: matmuls and convs in `dtype`, parameters float32."""
  def wrapped():
    with torch.autocast('cpu', dtype=dtype):
      return step()
  return wrapped


WORKLOADS = {'gpt': gpt_workload, 'simclr': simclr_workload, 'mae': mae_workload}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', choices=sorted(WORKLOADS), required=True)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--threads', type=int, default=None, help="default: torch's own")
  parser.add_argument('--vocab', type=int, default=1024, help='gpt vocabulary size')
  parser.add_argument('--pool', type=int, default=1024, help='random images to draw from')
  parser.add_argument('--images', default=None,
                      help="mae: an npz of uint8 'images' (N, H, W, 3) read through MAE's loader")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--autocast', choices=['bfloat16'], default=None,
                      help="run each step under torch.autocast('cpu', dtype) (the authors' "
                           'CPU recipes do not; for comparisons with ssl_jax in bfloat16)')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  step, examples, tokens = WORKLOADS[args.workload](args)
  if args.autocast:
    step = autocast(step, getattr(torch, args.autocast))
  for _ in range(args.warmup):
    step()
  times, loss = [], float('nan')
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  result = {
      'workload': args.workload, 'steps': args.steps, 'warmup': args.warmup,
      'batch_size': examples, 'step_time_s': median,
      'step_time_p10_s': float(np.percentile(times, 10)),
      'step_time_p90_s': float(np.percentile(times, 90)),
      'step_time_min_s': min(times), 'step_time_max_s': max(times),
      'examples_per_s': examples / median, 'loss': loss,
      'torch_version': torch.__version__, 'num_threads': torch.get_num_threads(),
      'autocast': args.autocast,
  }
  if tokens:
    result['tokens_per_s'] = tokens / median
  print(f"{'workload':>13} | {args.workload} (batch {examples}, torch {torch.__version__}, "
        f"{result['num_threads']} threads)")
  print(f"{'step time':>13} | median {1e3 * median:.1f} ms (p10 "
        f"{1e3 * result['step_time_p10_s']:.1f}, p90 {1e3 * result['step_time_p90_s']:.1f}) "
        f"over {args.steps} steps")
  print(f"{'throughput':>13} | {result['examples_per_s']:.1f} examples/s"
        + (f", {result['tokens_per_s']:.0f} tokens/s" if tokens else ''))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()

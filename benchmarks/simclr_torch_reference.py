"""A PyTorch + kornia SimCLR of the same small recipe, to compare learning per step with ours.

It runs in its own virtual environment, never in the project's (torch is not a
dependency of ssl_jax):

  python -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 kornia==0.9.0 numpy scikit-learn
  python -m benchmarks.simclr_side_by_side --out /tmp/sbs   # project venv: data, ours
  /tmp/torchvenv/bin/python benchmarks/simclr_torch_reference.py \
      --train /tmp/sbs/train.npz --test /tmp/sbs/test.npz

The recipe is the one a new user tries with lightly and kornia: ResNet-18 with
a 3x3 stem and no max-pool at a quarter width (16 channels in the first
stage), a projection 128 -> 512 -> 128 (Linear without bias + BatchNorm, ReLU
between; the last BatchNorm without shift, as SimCLR's model_util and ours),
NT-Xent with temperature 0.5 as the mean over the 2N anchors (lightly's
NTXentLoss), SGD momentum 0.9, lr 0.12 on a cosine over all steps, weight
decay 5e-4, batch 256; views: RandomResizedCrop(0.08, 1) + flip + colour
jitter (0.4, 0.4, 0.4, 0.1) with p 0.8 + grayscale p 0.2, made by kornia on the
batch. Every choice where a PyTorch script commonly differs from ssl_jax is a
flag, so each can be tried on its own:

  --zero_init_residual  each block's last BatchNorm starts at gamma 0 (SimCLR's
                        code and our paper variants; lightly does not)
  --bn_per_view         encode the two views in two forward passes, so each
                        BatchNorm normalises one view (lightly's examples);
                        default: one pass over both views (ours, SimCLR's)
  --decay_all           weight decay on every parameter (torch SGD's
                        weight_decay); default: kernels only (ours, SimCLR's)

It prints the kNN top-1 (k 200, T 0.1, cosine, on the pooled features; the
train split's features vote for each test image, as ssl_jax's eval.knn) of the
random init and every `--eval_every` steps, and a JSON object as its last
line.
"""

import argparse
import json
import math
import time

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (v1.5 has no effect on it)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
    self.shortcut = nn.Identity()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
  """ResNet-18, CIFAR stem (3x3/1 conv, no max-pool), first stage `width` channels."""

  def __init__(self, width: int = 16, channels: int = 3, zero_init_residual: bool = False):
    super().__init__()
    self.stem = nn.Sequential(conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU())
    layers, cin = [], width
    for stage in range(4):
      cout = width * 2**stage
      for block in range(2):
        layers.append(BasicBlock(cin, cout, 2 if stage and not block else 1))
        cin = cout
    self.layers = nn.Sequential(*layers)
    self.num_features = cin
    for m in self.modules():  # torchvision's init
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    if zero_init_residual:
      for m in self.modules():
        if isinstance(m, BasicBlock):
          nn.init.zeros_(m.bn2.weight)

  def forward(self, x):
    return self.layers(self.stem(x)).mean(dim=(2, 3))  # (B, D)


class Projection(nn.Module):
  """Linear(no bias) + BN + ReLU, Linear(no bias) + BN without shift; N(0, 0.01) kernels."""

  def __init__(self, cin: int, hidden: int, cout: int):
    super().__init__()
    self.fc1, self.bn1 = nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden)
    self.fc2, self.bn2 = nn.Linear(hidden, cout, bias=False), nn.BatchNorm1d(cout)
    self.bn2.bias.requires_grad_(False)
    for fc in (self.fc1, self.fc2):
      nn.init.normal_(fc.weight, std=0.01)

  def forward(self, x):
    return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))


def ntxent(z1, z2, temperature):
  """Mean over the 2N anchors (lightly's NTXentLoss, ssl_jax.losses.ntxent_loss)."""
  z = F.normalize(torch.cat([z1, z2]), dim=1)
  logits = z @ z.T / temperature
  n = len(z1)
  logits.fill_diagonal_(-1e9)
  targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
  return F.cross_entropy(logits, targets)


@torch.no_grad()
def knn_top1(encoder, train_x, train_y, test_x, test_y, k=200, temperature=0.1, classes=10):
  """DINO's weighted kNN on cosine similarities, votes exp(sim / T)."""
  encoder.eval()
  train_f = F.normalize(encoder(train_x), dim=1)
  test_f = F.normalize(encoder(test_x), dim=1)
  encoder.train()
  sims, idx = (test_f @ train_f.T).topk(k, dim=1)
  votes = torch.zeros(len(test_x), classes).scatter_add_(
      1, train_y[idx], (sims / temperature).exp())
  return (votes.argmax(1) == test_y).float().mean().item()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train', required=True, help='npz: images (N, H, W, 3) uint8, labels')
  parser.add_argument('--test', required=True, help='npz: images (N, H, W, 3) uint8, labels')
  parser.add_argument('--steps', type=int, default=195)
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--lr', type=float, default=0.12)
  parser.add_argument('--weight_decay', type=float, default=5e-4)
  parser.add_argument('--temperature', type=float, default=0.5)
  parser.add_argument('--width', type=int, default=16)
  parser.add_argument('--eval_every', type=int, default=39)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--zero_init_residual', action='store_true')
  parser.add_argument('--bn_per_view', action='store_true')
  parser.add_argument('--decay_all', action='store_true')
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(args.seed)

  train, test = np.load(args.train), np.load(args.test)
  mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
  std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

  def tensor01(images):  # uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

  train01 = tensor01(train['images'])
  train_x, test_x = (train01 - mean) / std, (tensor01(test['images']) - mean) / std
  train_y = torch.from_numpy(train['labels']).long()
  test_y = torch.from_numpy(test['labels']).long()
  size = train01.shape[-1]
  augment = nn.Sequential(
      K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
      K.RandomHorizontalFlip(),
      K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
      K.RandomGrayscale(p=0.2),
  )

  encoder = ResNet18(args.width, zero_init_residual=args.zero_init_residual)
  projector = Projection(encoder.num_features, 512, 128)
  params = list(encoder.parameters()) + [p for p in projector.parameters() if p.requires_grad]
  if args.decay_all:
    groups = [{'params': params, 'weight_decay': args.weight_decay}]
  else:  # Kernels only: no decay on BatchNorm parameters (ours and SimCLR's).
    kernels = [p for p in params if p.ndim > 1]
    others = [p for p in params if p.ndim <= 1]
    groups = [{'params': kernels, 'weight_decay': args.weight_decay},
              {'params': others, 'weight_decay': 0.0}]
  optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))

  curve = {0: knn_top1(encoder, train_x, train_y, test_x, test_y)}
  print(f'step 0 knn_top1 {curve[0]:.4f}', flush=True)
  order, position, start = rng.permutation(len(train01)), 0, time.time()
  for step in range(1, args.steps + 1):
    if position + args.batch > len(order):  # A new permutation each epoch, as ours.
      order, position = np.concatenate([order[position:], rng.permutation(len(train01))]), 0
    batch = train01[order[position:position + args.batch]]
    position += args.batch
    v1, v2 = ((augment(batch) - mean) / std), ((augment(batch) - mean) / std)
    if args.bn_per_view:
      z1, z2 = projector(encoder(v1)), projector(encoder(v2))
    else:
      z = projector(encoder(torch.cat([v1, v2])))
      z1, z2 = z[:len(batch)], z[len(batch):]
    loss = ntxent(z1, z2, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    if step % args.eval_every == 0 or step == args.steps:
      curve[step] = knn_top1(encoder, train_x, train_y, test_x, test_y)
      rate = step * args.batch / (time.time() - start)
      print(f'step {step} loss {loss.item():.4f} knn_top1 {curve[step]:.4f} '
            f'({rate:.0f} images/s)', flush=True)
  print(json.dumps({'knn_curve': curve, 'knn_top1': curve[args.steps],
                    'flags': {k: v for k, v in vars(args).items() if k not in ('train', 'test')}}))


if __name__ == '__main__':
  main()

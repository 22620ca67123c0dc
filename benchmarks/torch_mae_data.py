"""MAE's training data path for benchmarks/torch_peers.py (torch venv only; issue 15).

facebookresearch/mae main_pretrain.py (at 3c8c715) reads ImageNet through
`transform_train` (RandomResizedCrop, RandomHorizontalFlip, ToTensor,
Normalize), a DistributedSampler(shuffle=True) and a DataLoader with
`--num_workers` 10 (L89) and drop_last. Here the same path runs over the
uint8 images ssl_jax's side reads (the side-by-side's train.npz), at
ssl_jax's `:local` crop (scale 0.35-1, bilinear, no flip): the same work as
ssl_jax's host pipeline. RandomResizedCrop follows torchvision's get_params
(ten tries of area and log-ratio, then the whole image) and crops, then
resizes, the PIL image. Workers: min(10, CPUs), kept across epochs
(persistent_workers) so that a 1,437-image set does not restart them every
11 batches. torchvision itself is not installed: PyPI's wheel does not load
against the +cpu torch (`operator torchvision::nms does not exist`), so its
transforms are written out on PIL.
"""

import math
import os

import numpy as np
import torch
from PIL import Image


class CroppedImages(torch.utils.data.Dataset):
  """MAE's transform_train on uint8 (N, H, W, C) images, as torchvision runs it on PIL images."""

  def __init__(self, images: np.ndarray, size: int = 32, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    self.images, self.size, self.scale, self.log_ratio = images, size, scale, np.log(ratio)

  def __len__(self):
    return len(self.images)

  def box(self, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) with torch's RNG."""
    for _ in range(10):
      area = height * width * torch.empty(1).uniform_(*self.scale).item()
      aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
      w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        return (torch.randint(0, height - h + 1, (1,)).item(),
                torch.randint(0, width - w + 1, (1,)).item(), h, w)
    side = min(height, width)  # The square images here: the fallback is the whole image.
    return (height - side) // 2, (width - side) // 2, side, side

  def __getitem__(self, index: int) -> torch.Tensor:
    image = Image.fromarray(self.images[index])
    top, left, h, w = self.box(image.height, image.width)
    image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size),
                                                            Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - 0.5) / 0.5  # ToTensor, Normalize(0.5, 0.5).


def reference_batches(path: str, batch: int):
  """Endless batches of MAE's DataLoader over the uint8 'images' array of the npz at `path`."""
  dataset = CroppedImages(np.load(path)['images'])
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch, shuffle=True, drop_last=True, persistent_workers=True,
      num_workers=min(10, os.cpu_count() or 1))
  while True:
    yield from loader

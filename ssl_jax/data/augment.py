"""Host-side image augmentations on uint8 (H, W, C) numpy arrays.

They run inside grain workers, before batching, so they use numpy and Pillow
only. Randomness always comes from the `np.random.Generator` that grain's
`random_map` hands in, which makes every crop a pure function of the pipeline
seed and the element's position in the stream.
"""

import math

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the ones Pillow's convert('L') uses.
LUMA_601 = np.array([0.299, 0.587, 0.114], np.float32)

# `config.data.interpolation` -> Pillow filter. MAE and DINO resize with
# bicubic (torchvision `interpolation=3`); both antialias when shrinking.
INTERPOLATIONS = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC}


def _filter(interpolation: str) -> Image.Resampling:
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation={interpolation!r}; expected one of {sorted(INTERPOLATIONS)}')
  return INTERPOLATIONS[interpolation]


def _to_pil(image: np.ndarray) -> Image.Image:
  """uint8 (H, W, 1|3) -> a Pillow image in mode 'L' or 'RGB'."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'Expected a uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}')
  # uint8 2-D arrays become mode 'L', (H, W, 3) ones mode 'RGB'.
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image) -> np.ndarray:
  """A Pillow 'L' or 'RGB' image -> uint8 (H, W, 1|3)."""
  pixels = np.asarray(image, dtype=np.uint8)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Samples a crop box (top, left, h, w) exactly as torchvision does."""
  # torchvision/transforms/transforms.py, RandomResizedCrop.get_params: ten
  # tries of an area fraction ~ U(scale) and an aspect ratio log-uniform in
  # `ratio`; a try fits when the rounded box lies inside the image.
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # No try fitted: the whole image, center-cropped to the nearest allowed ratio.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = 'bilinear',
) -> np.ndarray:
  """Inception-style random crop resized to (size, size); mirrors torchvision.

  The box is sampled like torchvision's `RandomResizedCrop` (see
  `random_resized_crop_box`), then resized with Pillow's bilinear or bicubic
  filter, which antialiases when shrinking, as torchvision does on PIL images.

  Args:
    image: uint8 (H, W, C) with C 1 or 3.
    rng: the generator that decides the crop.
    size: output height and width.
    scale: range of the crop's area as a fraction of the image's area.
    ratio: range of the crop's aspect ratio (width / height).
    interpolation: 'bilinear' or 'bicubic'.

  Returns:
    uint8 (size, size, C).
  """
  height, width = image.shape[:2]
  top, left, h, w = random_resized_crop_box(height, width, rng, scale, ratio)
  # Crop, then resize, as torchvision's resized_crop: resizing with `box=`
  # would let the filter read pixels outside the box.
  crop = np.ascontiguousarray(image[top:top + h, left:left + w])
  return _from_pil(_to_pil(crop).resize((size, size), _filter(interpolation)))


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Mirrors the image left-right with probability `p`."""
  if rng.random() < p:
    return np.ascontiguousarray(image[:, ::-1])
  return image


def center_crop_resize(image: np.ndarray, size: int, crop_fraction: float = 0.875,
                       interpolation: str = 'bilinear') -> np.ndarray:
  """Eval transform: shorter side to round(size / crop_fraction), center size x size crop.

  The default 0.875 is the classic ImageNet 256 -> 224 evaluation; 1.0
  resizes the shorter side to `size` and crops the longer one. Resize and crop
  round like torchvision's `Resize(int)` and `CenterCrop`.
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction}')
  height, width = image.shape[:2]
  short = round(size / crop_fraction)
  # torchvision Resize(int): the shorter side becomes `short`, the longer one
  # keeps the aspect ratio, truncated.
  if height <= width:
    new_h, new_w = short, int(short * width / height)
  else:
    new_h, new_w = int(short * height / width), short
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  resized = _to_pil(image).resize((new_w, new_h), _filter(interpolation))
  return _from_pil(resized.crop((left, top, left + size, top + size)))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Converts uint8 (H, W, C) to `channels`: 1->3 repeats, 3->1 takes BT.601 luma."""
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have == 3 and channels == 1:
    luma = image.astype(np.float32) @ LUMA_601
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f'Cannot convert an image with {have} channels to {channels} channels')

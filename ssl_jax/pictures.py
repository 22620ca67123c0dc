"""Image grids for the logs, saved as PNG under `workdir/images/` (numpy and PIL only)."""

import numpy as np
from etils import epath
from PIL import Image


def image_grid(rows: np.ndarray, pad: int = 2, min_size: int = 64) -> np.ndarray:
  """(R, K, H, W, C) uint8 -> one picture of R rows and K columns, white-padded.

  Small images are enlarged by pixel repetition to at least `min_size`
  pixels so that 8x8 digits stay visible in TensorBoard.
  """
  scale = max(1, -(-min_size // max(rows.shape[2:4])))
  rows = rows.repeat(scale, axis=2).repeat(scale, axis=3)
  num_rows, num_cols, height, width, channels = rows.shape
  if channels == 1:
    rows = np.repeat(rows, 3, axis=-1)
  out = np.full((num_rows * (height + pad) + pad, num_cols * (width + pad) + pad, 3), 255,
                np.uint8)
  for r in range(num_rows):
    for c in range(num_cols):
      top, left = pad + r * (height + pad), pad + c * (width + pad)
      out[top:top + height, left:left + width] = rows[r, c]
  return out


def save_png(picture: np.ndarray, path: epath.PathLike) -> None:
  """Writes an (H, W, 3) uint8 picture as PNG (local or remote path)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(picture).save(f, format='PNG')

"""Where numbers go: metrics.jsonl, TensorBoard event files and the progress line.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step
(`step`, `loss`, `lr`, throughput, and eval results when they run).
TensorBoard files are written by tensorboardX, which needs no TensorFlow:
`tensorboard --logdir WORKDIR`.
"""

import datetime
import json
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def _to_python(value: Any) -> Any:
  """numpy / jax scalars -> plain Python numbers for JSON."""
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; writes images to TensorBoard."""

  def __init__(self, workdir: epath.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    self._workdir = epath.Path(workdir)
    self._jsonl = self._workdir / 'metrics.jsonl'
    self._tb_writer = None
    # Object stores (gs://) cannot append: keep the text and rewrite the file,
    # at most once a minute and at close.
    self._remote = '://' in str(self._workdir)
    self._remote_text = self._jsonl.read_text() if self._remote and self._jsonl.exists() else ''
    self._remote_saved = time.monotonic()

  @property
  def _tb(self):
    """The TensorBoard writer, opened at the first write (no empty event files)."""
    if self._tb_writer is None:
      import tensorboardX  # Imported here: only process 0 needs it.
      self._tb_writer = tensorboardX.SummaryWriter(logdir=str(self._workdir), flush_secs=10)
    return self._tb_writer

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    """One metrics.jsonl line and one TensorBoard scalar per key."""
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _to_python(v) for k, v in scalars.items()}}
    line = json.dumps(record) + '\n'
    if self._remote:
      self._remote_text += line
      if time.monotonic() - self._remote_saved > 60:
        self._save_remote()
    else:
      with self._jsonl.open('a') as f:
        f.write(line)
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, int(step))

  def write_image(self, step: int, name: str, picture: np.ndarray) -> None:
    """An (H, W, 3) uint8 picture in TensorBoard's Images tab."""
    if self.enabled:
      self._tb.add_image(name, picture, int(step), dataformats='HWC')

  def truncate(self, last_step: int) -> None:
    """Drops metrics.jsonl lines logged after `last_step` (work a resume will redo)."""
    if not self.enabled:
      return
    text = self._remote_text if self._remote else (
        self._jsonl.read_text() if self._jsonl.exists() else '')
    kept = ''.join(line + '\n' for line in text.splitlines()
                   if line.strip() and json.loads(line)['step'] <= last_step)
    if self._remote:
      self._remote_text = kept
    if kept != text:
      self._jsonl.write_text(kept)

  def _save_remote(self) -> None:
    self._jsonl.write_text(self._remote_text)
    self._remote_saved = time.monotonic()

  def close(self) -> None:
    """Writes what is pending and closes the event file."""
    if self._remote and self.enabled:
      self._save_remote()
    if self._tb_writer is not None:
      self._tb_writer.close()


# Dense bfloat16 peak FLOP/s per device, by `jax.Device.device_kind`, for MFU.
# From the vendors' spec sheets (no sparsity); unknown kinds (CPUs) get no MFU:
# cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e ("peak compute per chip (bf16)");
# nvidia.com/en-us/data-center/a100/ and /h100/ (BF16 Tensor Core, half of the
# "with sparsity" figure: 312 and 989 TFLOPS); the H200 has the H100's compute.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5': 459e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H200': 989e12,
}


class Progress:
  """Formats the console progress line: step, loss, lr, rates, model FLOP/s and ETA."""

  def __init__(self, total_steps: int, start_step: int, unit: str, units_per_step: int,
               *, flops_per_step: float | None = None, num_devices: int = 1,
               device_kind: str = ''):
    self.total_steps = total_steps
    self.unit = unit
    self.units_per_step = units_per_step
    self.flops_per_step = flops_per_step
    self.num_devices = num_devices
    self.peak_flops = PEAK_FLOPS.get(device_kind)
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._elapsed = 0.0
    self._input_seconds = 0.0
    self._first_line = True

  def waited_for_input(self, seconds: float) -> None:
    """Adds host time spent getting a batch (next(data_iter) + put_batch) to this window."""
    self._input_seconds += seconds

  def rates(self, step: int) -> dict[str, float]:
    """Steps/s, units/s, model FLOP/s (MFU) and the input-wait share since the previous call.

    `input_wait` is the share of the window's wall time the host spent
    getting batches (`waited_for_input`); with asynchronous dispatch part of
    it overlaps the device's work, so it bounds the time lost to input.
    """
    now = time.perf_counter()
    self._elapsed = now - self._last_time
    steps_per_sec = (step - self._last_step) / max(self._elapsed, 1e-9)
    self._last_time, self._last_step = now, step
    rates = {'steps_per_sec': steps_per_sec,
             f'{self.unit}_per_sec': steps_per_sec * self.units_per_step,
             'input_wait': self._input_seconds / max(self._elapsed, 1e-9)}
    self._input_seconds = 0.0
    if self.flops_per_step:
      per_device = steps_per_sec * self.flops_per_step / self.num_devices
      rates['tflops_per_sec_per_device'] = per_device / 1e12
      if self.peak_flops:
        rates['mfu'] = per_device / self.peak_flops
    return rates

  def line(self, step: int, scalars: dict[str, Any]) -> str:
    """'step 120/1000 | loss 0.8123 | lr 0.0012 | 15.3 steps/s | 3917 images/s | ETA 0:00:57'."""
    if self._first_line:  # Its time is mostly compilation: no rate or ETA to show.
      self._first_line = False
      return (f'step {step}/{self.total_steps} | loss {scalars["loss"]:.4f} | '
              f'lr {scalars["lr"]:.3g} | compiled and ran in {self._elapsed:.1f} s')
    steps_per_sec = scalars['steps_per_sec']
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float('inf')
    eta_text = str(datetime.timedelta(seconds=round(eta))) if np.isfinite(eta) else '?'
    flops = ''
    if 'mfu' in scalars:
      flops = f' | MFU {100 * scalars["mfu"]:.1f}%'
    elif 'tflops_per_sec_per_device' in scalars:
      flops = f' | {scalars["tflops_per_sec_per_device"] * 1e3:.1f} GFLOP/s/device'
    return (f'step {step}/{self.total_steps} | loss {scalars["loss"]:.4f} | '
            f'lr {scalars["lr"]:.3g} | {steps_per_sec:.2f} steps/s | '
            f'{scalars[f"{self.unit}_per_sec"]:.0f} {self.unit}/s{flops} | '
            f'input wait {100 * scalars.get("input_wait", 0.0):.1f}% | ETA {eta_text}')


def log_line(text: str) -> None:
  """Prints a line for the user on process 0's stdout (other processes stay quiet)."""
  if jax.process_index() == 0:
    print(text, flush=True)

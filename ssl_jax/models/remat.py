"""Rematerialisation (`model.remat`): which activations a block keeps for its backward pass.

Every model applies its repeated unit (a transformer block, a ResNet
residual block) through `checkpointed`, so one config key chooses for all
of them, with MaxText's policy names in mind (MaxText `remat_policy`:
'minimal' is `dots_with_no_batch_dims_saveable`, 'full' saves nothing):

- 'none' / False: every activation is kept, nothing recomputed.
- 'full' / True (and 'nothing_saveable', the same): only the block's input
  is kept; the whole block runs again in the backward pass.
- 'dots': the outputs of matmuls without batch dimensions (the Linear
  layers) are kept; attention scores, norms and GELU are recomputed.
- 'dots_saveable': the outputs of every matmul (attention's too) are kept;
  norms, GELU and softmax are recomputed.

Any policy gives the same gradients as none (only memory and time differ).
"""

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from ssl_jax.errors import ConfigError

POLICIES: dict[str, Callable[..., bool] | None] = {
    'full': None,  # jax.checkpoint's default: nothing saved but the inputs.
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}
_OFF = ('none', 'false', '')
_FULL = ('true',)


def policy_name(remat: Any) -> str | None:
  """The policy `model.remat` names (None: no remat); accepts bools and their spellings.

  The strings 'True' / 'False' are accepted as well as bools, since a
  command-line override of a string key arrives as text.
  """
  if remat is None or remat is False:
    return None
  if remat is True:
    return 'full'
  name = str(remat).strip().lower()
  if name in _OFF:
    return None
  if name in _FULL:
    return 'full'
  if name not in POLICIES:
    raise ConfigError(f'config.model.remat={remat!r} is not a remat policy: use one of '
                      f"'none', {', '.join(repr(p) for p in POLICIES)} (or True / False).")
  return name


def checkpointed(fn: Callable, remat: Any) -> Callable:
  """`fn` (a function of nnx modules and arrays), rematerialised as `remat` names."""
  name = policy_name(remat)
  if name is None:
    return fn
  return nnx.remat(fn, policy=POLICIES[name])

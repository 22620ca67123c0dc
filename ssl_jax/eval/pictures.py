"""`pictures` (config.eval.pictures): what the method draws, under images/ and in TensorBoard.

The method's `visualize` (jitted, on a train batch) returns arrays that its
`render` turns into an (H, W, 3) uint8 picture on the host: MAE's
reconstructions, SimCLR's views, DINO's attention maps.
"""

import jax
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax import pictures
from ssl_jax.eval.base import Evaluation, Round


class Pictures(Evaluation):
  """Saves `images/step_<step>.png` and a TensorBoard image; logs no number."""

  requires = 'pictures'

  def __init__(self, *args):
    super().__init__(*args)
    method, graphdef = self.context.method, self.context.graphdef
    self._visualize = jax.jit(lambda params, rest, batch, rng: method.visualize(
        nnx.merge(graphdef, params, rest), batch, rng))

  def run(self, round_: Round) -> dict[str, float]:
    ctx, state = self.context, round_.state
    arrays = self._visualize(state['params'], state['model_state'], round_.batch, round_.rng)
    if arrays is None:
      return {}
    picture = ctx.method.render(multihost_utils.process_allgather(arrays, tiled=True))
    if jax.process_index() == 0:
      pictures.save_png(picture, ctx.workdir / 'images' / f'step_{round_.step:07d}.png')
    ctx.writer.write_image(round_.step, ctx.method.picture_name, picture)
    return {}

r"""Continues a prompt with a trained GPT run, as nanoGPT's sample.py.

  python -m ssl_jax.sample --workdir=DIR --prompt="The " \
      [--max_new_tokens=200 --temperature=0.8 --top_k=200 --seed=0 --num_samples=1]

Reads DIR/config.json (the model), DIR/tokenizer.json (the run's tokenizer)
and the params of the newest checkpoint in DIR/checkpoints (or, without one,
the export in DIR/export), then samples with `ssl_jax.models.sampling`: the
prompt fills a KV cache once and a jitted scan adds one token a step. The
same --seed gives the same text. An empty prompt starts from <|endoftext|>.
Past the model's context the window slides: generation restarts from the
last half-context of tokens (nanoGPT slides by one token, without a cache).
"""

import sys

import jax
import numpy as np
from absl import app, flags
from etils import epath
from flax import nnx

from ssl_jax import checkpoint, host_memory, methods, sharding
from ssl_jax.cli import quiet_logging
from ssl_jax.data.tokenizer import FILENAME, Tokenizer, load_tokenizer
from ssl_jax.errors import UserError
from ssl_jax.methods.language import LanguageModelMethod
from ssl_jax.models import sampling
from ssl_jax.models.lm import TransformerLM

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a GPT run (configs/gpt.py).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue ("" starts a new document).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 200, 'Sample among the k most likely tokens (0: all).')
_SEED = flags.DEFINE_integer('seed', 0, 'PRNG seed: the same seed gives the same text.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Independent continuations.')
flags.mark_flag_as_required('workdir')


def load_model(workdir: epath.Path) -> tuple[TransformerLM, Tokenizer, str]:
  """(causal TransformerLM with the run's newest weights, its tokenizer, where they came from)."""
  if not (workdir / 'config.json').exists():
    raise UserError(f'{workdir} holds no trained run (no config.json); train one with '
                    'python -m ssl_jax.main --config=configs/gpt.py:local --workdir=DIR')
  config = checkpoint.load_config(workdir / 'config.json')
  method = methods.create(config)
  if not (isinstance(method, LanguageModelMethod) and method.transformer_config().causal):
    raise UserError(f'{workdir} holds a {config.method!r} run; sampling needs a causal model '
                    '(a configs/gpt.py run)')
  if not (workdir / FILENAME).exists():
    raise UserError(f'{workdir} holds no {FILENAME}: the tokenizer the run was trained with')
  tokenizer = load_tokenizer(workdir / FILENAME)
  mesh = sharding.make_mesh(sharding.mesh_config(), jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    abstract = nnx.eval_shape(lambda: method.build(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = checkpoint.abstract_with_shardings(params, sharding.state_shardings(params, mesh))
    if checkpoint.latest_saved_step(workdir) is not None:
      params, _, step = checkpoint.restore_params(workdir, params)
      source = f'checkpoint step {step}'
    elif (workdir / 'export' / 'encoder').exists():
      params = checkpoint.restore_export(workdir / 'export', params)
      source = 'the export'
    else:
      raise UserError(f'{workdir} holds no checkpoint and no export: nothing to sample from')
  return nnx.merge(graphdef, params, rest), tokenizer, source


def sample(workdir: epath.Path, prompt: str, *, max_new_tokens: int, temperature: float,
           top_k: int, seed: int, num_samples: int = 1) -> list[str]:
  """`num_samples` texts: the prompt and its continuation (only the continuation if empty)."""
  if max_new_tokens < 1 or temperature < 0 or top_k < 0 or num_samples < 1:
    raise UserError('--max_new_tokens and --num_samples must be >= 1, --temperature and '
                    '--top_k >= 0')
  model, tokenizer, _ = load_model(workdir)
  prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
  context = model.config.max_len
  if len(prompt_ids) >= context:
    raise UserError(f'the prompt is {len(prompt_ids)} tokens; the model\'s context of {context} '
                    f'tokens leaves room to continue at most {context - 1}: shorten it')
  prompts = np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1))
  new = continue_tokens(model, prompts, jax.random.key(seed), max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k or None)
  kept = prompt_ids if prompt else []
  return [tokenizer.decode(kept + row.tolist()) for row in new]


def continue_tokens(model: TransformerLM, prompts: np.ndarray, key: jax.Array, *,
                    max_new_tokens: int, temperature: float, top_k: int | None) -> np.ndarray:
  """(B, P) prompts -> (B, max_new_tokens) new ids; beyond the context, in sliding windows."""
  context, sequences, window = model.config.max_len, prompts, 0
  while (done := sequences.shape[1] - prompts.shape[1]) < max_new_tokens:
    visible = sequences if window == 0 else sequences[:, -(context // 2):]
    count = min(max_new_tokens - done, context - visible.shape[1])
    new = sampling.generate(model, visible, jax.random.fold_in(key, window),
                            max_new_tokens=count, temperature=temperature, top_k=top_k)
    sequences = np.concatenate([sequences, np.asarray(new)], axis=1)
    window += 1
  return sequences[:, prompts.shape[1]:]


def main(argv: list[str]) -> None:
  """Prints each sample, separated by a line of dashes."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  quiet_logging()
  host_memory.keep_freed_memory()  # Before jax starts its backend.
  try:
    texts = sample(epath.Path(_WORKDIR.value), _PROMPT.value,
                   max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                   top_k=_TOP_K.value, seed=_SEED.value, num_samples=_NUM_SAMPLES.value)
  except UserError as e:
    sys.exit(f'error: {e}')
  print('\n---------------\n'.join(texts))


if __name__ == '__main__':
  app.run(main)

r"""GPT next-token pretraining (Radford et al. 2019, GPT-2), with nanoGPT's recipe.

Variants (`--config=configs/gpt.py:VARIANT`):
  (none)  GPT-2 124M (12 layers, 768 wide, 12 heads, context 1024) as nanoGPT's
          train_gpt2.py: AdamW lr 6e-4, betas (0.9, 0.95), wd 0.1, clip 1.0,
          2000 warmup steps, cosine to 6e-5 at 600k steps, 512 x 1024 tokens a
          step, no dropout, bfloat16 compute. The model is GPT-2's own (biases,
          tanh GELU), so Hugging Face gpt2 weights load; nanoGPT trains its
          variant (train.py L56 bias=False, model.py L83 erf nn.GELU()):
          --config.model.use_bias=False --config.model.gelu=erf.
  medium  GPT-2 medium (350M: 24 layers, 1024 wide, 16 heads), lr 3e-4.
  large   GPT-2 large (774M: 36 layers, 1280 wide, 20 heads), lr 2.5e-4.
  xl      GPT-2 XL (1.5B: 48 layers, 1600 wide, 25 heads), lr 2e-4, every block
          rematerialised and the 512-sequence batch taken in 32 micro-batches,
          for 80 GB devices sharded with --config.mesh.fsdp=8 (its dry run's
          figures: README, "Big models and dry runs").
  char    nanoGPT's character-level tiny-Shakespeare run (6 layers, 6 heads, 384
          wide, context 256, dropout 0.2, lr 1e-3, batch 64, 5000 steps) with
          nanoGPT's model: no biases, exact (erf) GELU; give it the file:
          --config.data.source=text:PATH/input.txt (default: pydoc).
  local   a small GPT on the embedded pydoc text: minutes on 2 CPU cores.

  python -m ssl_jax.main --config=configs/gpt.py:local --workdir=/tmp/gpt
  python -m ssl_jax.sample --workdir=/tmp/gpt --prompt="The "

Data. nanoGPT trains on OpenWebText, which TFDS does not have; the default is
the same amount of web text from C4 (Raffel et al. 2020): the first 5% of
tfds:c4/en's train split, ~8B GPT-2 tokens (OpenWebText: 9B), prepared in
array_record format (`tfds build c4/en --file_format=array_record`, which
needs Apache Beam), read from --config.data.tfds_dir. The tokenised stream is
held in host memory (4 bytes a token: ~32 GB; slice less on small hosts).
Like nanoGPT's prepare.py, 0.05% of the text is held out for val loss.

Tokenizer. By default a byte-level BPE with GPT-2's vocabulary size (50257 =
256 bytes + 50000 merges + <|endoftext|>) is trained on the training split
(offline, deterministic, saved as WORKDIR/tokenizer.json). For GPT-2's own
vocabulary, download its tokenizer.json (huggingface.co/gpt2) and pass
--config.data.tokenizer=PATH/tokenizer.json. The model's vocabulary is the
tokenizer's unless model.vocab_size is set: nanoGPT pads it to 50304 (a
multiple of 64) for faster matmuls: --config.model.vocab_size=50304.

Batch. nanoGPT reaches ~0.5M tokens a step as 12 sequences x 40 gradient
accumulation steps = 480 x 1024 tokens; here the global batch is 512 x 1024 in
one step (no accumulation: shard it with --config.mesh.fsdp / more devices,
and --config.model.remat=full or dots if activations do not fit).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ssl_jax.config_blocks import eval_config, mesh_config, optim_config, train_config

# GPT-2 sizes (Radford et al. 2019, Table 2; Hugging Face gpt2, gpt2-medium, gpt2-large).
GPT2_SIZES = {
    'small': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    'medium': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    'large': dict(width=1280, depth=36, num_heads=20, mlp_dim=5120),
    # nanoGPT model.py L220 'gpt2-xl': n_layer=48, n_head=25, n_embd=1600 (1558M); MLP 4x.
    'xl': dict(width=1600, depth=48, num_heads=25, mlp_dim=6400),
}
# Peak learning rates of GPT-3's models of these sizes (Brown et al. 2020, Table 2.1).
# XL: GPT-3 XL's (1.3B); GPT-2 XL is 1.5B.
PEAK_LR = {'small': 6e-4, 'medium': 3e-4, 'large': 2.5e-4, 'xl': 2e-4}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The GPT config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.method = 'gpt'
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      source='tfds:c4/en:train[:5%]',
      tfds_dir=placeholder(str),
      objective='causal_lm',
      tokenizer='bpe',             # Or a path to a tokenizer.json (e.g. GPT-2's own).
      vocab_size=50257,            # Of a trained BPE; GPT-2's.
      seq_len=1024,
      val_fraction=0.0005,         # As nanoGPT's prepare.py for OpenWebText.
      batch_size=512,              # Global sequences a step: 512 x 1024 = 0.52M tokens.
      mask_prob=0.0,               # masked_lm only.
      num_workers=0,               # Windows are slices of one array: threads suffice.
      prefetch=4,
  ))

  config.model = ml_collections.ConfigDict(dict(
      **GPT2_SIZES['small'],
      vocab_size=placeholder(int),  # None: the tokenizer's (config.json records it).
      max_len=1024,
      dropout_rate=0.0,             # nanoGPT: 0 for pretraining.
      gelu='tanh',                  # GPT-2's gelu_new; 'erf' is exact (nanoGPT's nn.GELU()).
      use_bias=True,                # GPT-2's biases in every Linear and LayerNorm (HF layout).
      dtype='bfloat16',             # Compute dtype; parameters stay float32.
      remat='none',                 # Or 'full', 'dots', ... (ssl_jax/models/remat.py).
  ))

  config.optim = optim_config(
      name='adamw', lr=6e-4, lr_scaling='none', b1=0.9, b2=0.95, weight_decay=0.1,
      grad_clip_norm=1.0, warmup_steps=2000, schedule='warmup_cosine', min_lr=6e-5)

  # Evals: the next-token loss over the whole held-out split (`val_loss`).
  config.train = train_config(steps=600_000, eval_every=2000)
  config.eval = eval_config(batch_size=512, held_out=dict(enabled=True))

  config.mesh = mesh_config(data=-1, fsdp=1, tensor=1)

  if variant in ('medium', 'large', 'xl'):
    config.model.update(GPT2_SIZES[variant])
    config.optim.lr = PEAK_LR[variant]
  if variant == 'xl':
    # Activations of 48 blocks at 64 sequences a device do not fit 80 GB: keep only each
    # block's input and cut the step into micro-batches, as nanoGPT does (train_gpt2.py
    # L9-13: 12 sequences a GPU x 40 accumulation steps); same loss and update as one batch.
    # 32 micro-batches of 16 sequences (2 a device on 8) is what the CPU dry run shows to
    # fit (README, "Big models and dry runs"); on GPUs fewer, larger ones may fit.
    config.model.remat = 'full'
    config.train.grad_accum_steps = 32
  elif variant == 'char':
    _char(config)
  elif variant == 'local':
    _local(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r} of gpt.py: use medium, large, xl, char or '
                     'local.')
  return config


def _char(config: ml_collections.ConfigDict) -> None:
  """nanoGPT's config/train_shakespeare_char.py (val loss ~1.47 on tiny Shakespeare).

  Line numbers below are of karpathy/nanoGPT at 3adf61e: `char.py` is
  config/train_shakespeare_char.py, `train.py` the defaults it does not
  override, `model.py` the model. nanoGPT estimates losses on 200 random
  batches (char.py L6) where our eval reads the whole held-out split, and it
  keeps only the best checkpoint (char.py L10) where we keep the latest.
  """
  # char.py L18 batch_size, L19 block_size; prepare.py L39-40 holds out the last 10%.
  config.data.update(dict(source='pydoc', tokenizer='char', seq_len=256, batch_size=64,
                          val_fraction=0.1, prefetch=2))
  # char.py L22-25 n_layer, n_head, n_embd, dropout; model.py L82 MLP 4 x n_embd.
  # train.py L56 bias = False (not overridden): no bias in any Linear or LayerNorm;
  # model.py L83 nn.GELU(), the exact erf form. float32: nanoGPT's CPU run (char.py L35-37;
  # train.py L73 autocasts to bfloat16 only on a GPU).
  config.model.update(dict(width=384, depth=6, num_heads=6, mlp_dim=4 * 384, max_len=256,
                           dropout_rate=0.2, dtype='float32', use_bias=False, gelu='erf'))
  # char.py L27 lr, L28-29 max_iters = lr_decay_iters (the cosine ends at the last step),
  # L30 min_lr, L31 beta2, L33 warmup_iters; train.py L60-63 weight decay 0.1, beta1 0.9,
  # clip 1.0 are the GPT-2 block's above.
  config.optim.update(dict(lr=1e-3, b2=0.99, warmup_steps=100, min_lr=1e-4))
  # char.py L5 eval_interval, L7 log_interval; L17: no gradient accumulation, as here.
  config.train.update(dict(steps=5000, log_every=10, checkpoint_every=250, eval_every=250))
  config.eval.batch_size = 64


def _local(config: ml_collections.ConfigDict) -> None:
  """CPU scale: a 4-block GPT on pydoc with a 1024-token BPE, a few minutes on 2 cores."""
  config.data.update(dict(source='pydoc', vocab_size=1024, seq_len=128, batch_size=16,
                          val_fraction=0.1, prefetch=2))
  config.model.update(dict(width=128, depth=4, num_heads=4, mlp_dim=512, max_len=128,
                           dropout_rate=0.0, dtype='float32'))
  config.optim.update(dict(lr=2e-3, warmup_steps=50, min_lr=2e-4))
  config.train.update(dict(steps=400, log_every=50, checkpoint_every=200, eval_every=200))
  config.eval.batch_size = 64

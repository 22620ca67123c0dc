r"""BERT masked-LM pretraining (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional ...").

Variants (`--config=configs/bert_mlm.py:VARIANT`):
  (none)  BERT-base phase 1: 12 layers, 768 wide, 12 heads, post-LN, erf GELU, LayerNorm
          eps 1e-12, 512 positions; 128-token windows, batch 256, 900k steps (90% of
          the paper's 1M); Adam(W) lr 1e-4, betas (0.9, 0.999), eps 1e-6, wd 0.01,
          10k warmup steps, linear decay, global gradient norm clipped at 1.0;
          dropout 0.1; 15% masked (80/10/10).
  seq512  phase 2: 512-token windows, batch 256, the last 100k steps, starting from
          phase 1's weights: --config.train.init_from=PHASE1_WORKDIR.
  large   BERT-large (24 layers, 1024 wide, 16 heads), otherwise as phase 1.
  local   a small BERT on the embedded pydoc text: minutes on 2 CPU cores.

  python -m ssl_jax.main --config=configs/bert_mlm.py:local --workdir=/tmp/bert

The paper's one schedule over 1M steps (warmup 10k, then linear to 0) is cut
in two: phase 1 decays to the rate it has at step 900k (`min_lr`), phase 2
decays from there to 0 with no warmup, so the two runs follow the paper's
curve (Adam's moments restart at phase 2).

Data. The paper trains on English Wikipedia plus BooksCorpus; BooksCorpus is
not in TFDS, so the default is Wikipedia alone: tfds:wikipedia/20230601.en,
prepared in array_record format (`tfds build wikipedia/20230601.en
--file_format=array_record`, which needs Apache Beam) and read from
--config.data.tfds_dir. Its tokenised stream is held in host memory (~4.5B
tokens, 4 bytes each; slice it on small hosts: ...:train[:25%]). 0.1% of the
text is held out for the validation loss and masked-token accuracy.

Tokenizer. By default an uncased WordPiece of BERT's size (30522) is trained on
the training split (offline, deterministic; saved as WORKDIR/tokenizer.json).
For BERT's own vocabulary pass bert-base-uncased's tokenizer.json
(huggingface.co/bert-base-uncased): --config.data.tokenizer=PATH/tokenizer.json.

Differences from the paper, on purpose: no next-sentence prediction and
windows packed across documents (RoBERTa's FULL-SENTENCES, which it found at
least as good); masking is drawn afresh each epoch (RoBERTa's dynamic
masking) with an independent 15% chance per token; optax's AdamW keeps Adam's
bias correction, which BERT's AdamWeightDecayOptimizer omits.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ssl_jax.config_blocks import eval_config, mesh_config, optim_config, train_config

BERT_SIZES = {
    'base': dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    'large': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}
PEAK_LR = 1e-4
TOTAL_STEPS = 1_000_000  # Both phases.
WARMUP_STEPS = 10_000
PHASE1_STEPS = 900_000
# The paper's linear decay (PEAK_LR at WARMUP_STEPS, 0 at TOTAL_STEPS), at the end of phase 1.
PHASE2_LR = PEAK_LR * (TOTAL_STEPS - PHASE1_STEPS) / (TOTAL_STEPS - WARMUP_STEPS)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The BERT config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.method = 'bert'
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      source='tfds:wikipedia/20230601.en:train',
      tfds_dir=placeholder(str),
      objective='masked_lm',
      tokenizer='wordpiece',       # Or a path to a tokenizer.json (e.g. bert-base-uncased's).
      vocab_size=30522,            # Of a trained WordPiece; BERT's.
      seq_len=128,
      val_fraction=0.001,
      batch_size=256,              # Global windows a step.
      mask_prob=0.15,
      num_workers=8,               # Host-side masking: worker processes.
      prefetch=4,
  ))

  config.model = ml_collections.ConfigDict(dict(
      **BERT_SIZES['base'],
      vocab_size=placeholder(int),  # None: the tokenizer's (config.json records it).
      max_len=512,
      dropout_rate=0.1,
      gelu='erf',                   # BERT's exact GELU (modeling.py gelu: erf).
      use_bias=True,                # Biases in every Linear and LayerNorm.
      # The output head runs at the first k masked positions of each window (BERT's
      # max_predictions_per_seq); ~6 std above 0.15 x 128, so none is ever left out.
      max_predictions_per_seq=40,
      dtype='bfloat16',             # Compute dtype; parameters stay float32.
      remat='none',                 # Or 'full', 'dots', ... (ssl_jax/models/remat.py).
  ))

  # google-research/bert optimization.py, create_optimizer (lines 59-74): AdamWeightDecay
  # with these betas, eps and decay, and `tf.clip_by_global_norm(grads, clip_norm=1.0)`,
  # "This is how the model was pre-trained."
  config.optim = optim_config(
      name='adamw', lr=PEAK_LR, lr_scaling='none', b1=0.9, b2=0.999, eps=1e-6,
      weight_decay=0.01, warmup_steps=WARMUP_STEPS, schedule='warmup_linear', min_lr=PHASE2_LR,
      grad_clip_norm=1.0, grad_clip_scope='global')

  # Evals: masked-token loss and accuracy on the held-out split.
  config.train = train_config(steps=PHASE1_STEPS, checkpoint_every=5000, eval_every=10_000)
  config.eval = eval_config(batch_size=256, held_out=dict(enabled=True))

  config.mesh = mesh_config(data=-1, fsdp=1, tensor=1)

  if variant == 'seq512':
    config.data.seq_len = 512
    config.model.max_predictions_per_seq = 128  # ~6 std above 0.15 x 512.
    config.optim.update(dict(lr=PHASE2_LR, warmup_steps=0, min_lr=0.0))
    config.train.steps = TOTAL_STEPS - PHASE1_STEPS
  elif variant == 'large':
    config.model.update(BERT_SIZES['large'])
  elif variant == 'local':
    _local(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r} of bert_mlm.py: use seq512, large or local.')
  return config


def _local(config: ml_collections.ConfigDict) -> None:
  """CPU scale: a 4-block BERT on pydoc with a 2048-token WordPiece, minutes on 2 cores."""
  config.data.update(dict(source='pydoc', vocab_size=2048, seq_len=128, batch_size=16,
                          val_fraction=0.1, num_workers=0, prefetch=2))
  config.model.update(dict(width=128, depth=4, num_heads=4, mlp_dim=512, max_len=128,
                           dropout_rate=0.0, max_predictions_per_seq=40, dtype='float32'))
  # Post-LN BERT stalls at the unigram loss with lr 2e-3; 1e-3 leaves it after ~100 steps.
  config.optim.update(dict(lr=1e-3, warmup_steps=100, min_lr=0.0))
  config.train.update(dict(steps=400, log_every=50, checkpoint_every=200, eval_every=200))
  config.eval.batch_size = 64

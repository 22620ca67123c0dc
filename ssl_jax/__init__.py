"""ssl_jax: self-supervised pretraining (MAE, SimCLR, DINO, BERT, GPT) in JAX/Flax NNX."""

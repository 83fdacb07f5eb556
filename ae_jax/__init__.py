"""ae_jax: Associative Embedding + MobileNetV2 pose estimation in JAX/Flax."""

"""pspnet_jax: train, evaluate, serve and export PSPNet with JAX/Flax, from one CPU to a pod."""

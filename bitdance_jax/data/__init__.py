"""Training input: image and caption sources, augmentation, Grain pipelines, the latent cache, sequence packing."""

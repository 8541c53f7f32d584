"""Small helpers shared across bio_ext: finding the tensor in a model's output, copying and removing
forward hooks, saving and restoring random-number-generator state. Nothing here knows about modes."""

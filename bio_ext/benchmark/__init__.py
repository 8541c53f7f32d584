"""The benchmark runner's dataset and model layer (``data``, ``models``)."""

"""Input pipelines: data sources, grain pipelines and augmentations."""

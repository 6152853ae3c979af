"""Data: TFDS builders (ArrayRecord on disk), joint image/label augmentation, Grain loaders.

`synthetic` builds the procedural context dataset, `transforms` holds the
semseg augmentation and the evaluation resize, `pipeline` turns a TFDS split
into sharded, shuffled, augmented host batches and evaluation batches.
"""

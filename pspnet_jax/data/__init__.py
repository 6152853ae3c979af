"""Data: TFDS builders (ArrayRecord on disk), joint image/label augmentation, Grain loaders.

`registry` is the index of the supported datasets (builder, class names,
palette, official recipe) that the rest of the code reads; `labels` holds the
ignore label and the label check of the builders and the loader. `synthetic`
builds the procedural context dataset, `ade20k`, `cityscapes`, `voc_aug` and
`folder` the real ones from files (on `builders`), `prepare` is their command.
`transforms` holds the semseg augmentation and the evaluation resize,
`pipeline` turns a TFDS split into sharded, shuffled, augmented host batches
and evaluation batches.
"""

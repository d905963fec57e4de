"""Shared plumbing for the four method scripts: nothing here is any paper's contribution.

`sd_backbone` loads Stable Diffusion parts and captures features, `datasets` reads the ten datasets in their
official layouts, `metrics` scores predictions, `synthetic` writes a tiny sample of every dataset, `daformer`
holds the parts of DAFormer's recipe the methods borrow, `runtime` holds seeding, precision, DDP, checkpoints,
logging, profiling and memory prediction, `console` the one-line error and the terminal output.
"""

"""What the four method scripts share; nothing here is any paper's contribution.

`sd_backbone` loads Stable Diffusion parts and captures features; `datasets` (with `layouts`, `readers`,
`sampling`) reads the datasets in their official layouts; `synthetic` writes a small sample of every dataset;
`metrics` scores predictions and writes the run records; `daformer` holds what the methods borrow from DAFormer's
recipe; `cli` the command line and the terminal; `runs` processes, precision, seeding, checkpoints and the stop on
SIGTERM. `mini_sd` pretrains the mini SD (off the learning path).
"""

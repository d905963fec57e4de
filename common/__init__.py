"""What the four method scripts share (sd_backbone, datasets with layouts / readers / sampling / synthetic,
metrics, daformer, cli, runs); nothing here is any paper's contribution. mini_sd pretrains the mini SD."""

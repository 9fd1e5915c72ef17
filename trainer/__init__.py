"""Training, the loss zoo, metrics, the prior pass and the `csl` command line."""

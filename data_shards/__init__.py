"""The on-disk dataset: WebDataset tar shards with sparse partial labels, and everything
that writes, converts, simulates and streams them. See shared DESIGN.md, "Data contract"."""

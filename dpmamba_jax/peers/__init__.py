"""The paper's comparison methods (Table 1), one file each, written from their papers and from
what their public PyTorch code computes (docs/peers.md). `cnn.py` holds the layers they share."""

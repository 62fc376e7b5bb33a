"""Model cards: the versioned description of a classifier or segmenter checkpoint."""

"""Records: loading and validation, partitions, tokenization, the embedded clinical task."""

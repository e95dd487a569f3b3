"""Training: a transformers vision-language model with [SEG] and depth tokens and the four losses."""

"""Rows from a file or the hub, formatted for training and fitted to the tokenizer."""

"""The shipped shapes-tiny model's data, recipes and evaluation."""

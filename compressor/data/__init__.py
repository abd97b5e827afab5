"""Data: the shipped sentence sets (JSONL files beside this module) and `datasets`, which turns built-in sets,
user files and user functions into batches for evaluation, calibration and training."""

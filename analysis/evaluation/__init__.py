"""Evaluation of trained dictionaries: the metric formulas (DESIGN.md §4), splicing into the model
(downstream), feature mining, cross-seed stability and plots."""

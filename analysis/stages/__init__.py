"""The pipeline's stages as plain functions: each takes a SuiteSpec and a DataRoot, is idempotent
(content-derived paths; finished work is detected and reused) and returns a small summary dict.
Dagster assets call these; a notebook can call them too, without Dagster.
"""

"""Sampling outside training: loading exported pipelines and teacher folders, the teacher's sampler."""

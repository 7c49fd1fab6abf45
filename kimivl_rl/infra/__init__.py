"""Shared infrastructure: output paths and ownership, checkpoints, metrics, Ray and its calls,
and the learner → rollout weight transport."""

"""Online RL maths of kimivl-rl: k1.5 length penalty, group advantages, policy losses
(Kimi policy mirror descent and GRPO) and the difficulty-aware prompt sampler.

Everything here is pure and device-free so that it can be checked exactly against
hand-computed values; the learner and rollout code call into it.
"""

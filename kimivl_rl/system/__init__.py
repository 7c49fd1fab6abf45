"""The RL system: its actors (rollout, reward, learner), the loop that drives them (the
controller, with its collection, checkpoints and recovery), and the data jobs that sample a model
through the actors (difficulty labels, the long-CoT builder)."""

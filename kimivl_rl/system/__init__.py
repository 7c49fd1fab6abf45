"""The RL system: its actors (rollout, reward, learner), the loop that drives them, and the
difficulty labels that sample a model through them."""

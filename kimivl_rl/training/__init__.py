"""Training kernels shared by SFT and the RL learner: packing, the fused vocabulary loss and the
DeepSpeed engine."""

"""Reinforcement learning (paper section 4): advantage estimators and KL control, experience, the RL objectives."""

"""AI feedback (paper section 4.1): feedback prompts, labelling, preference-model math and objective, rewards."""

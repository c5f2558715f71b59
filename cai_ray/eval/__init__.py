"""Evaluation (stage 7): the AI judge, metrics, Elo, and the paper's multiple-choice evals."""

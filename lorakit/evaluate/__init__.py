"""Scoring models: loss/perplexity on a data set, generated answers, and the demo's before/after figures."""
from lorakit.evaluate.generation import chat_prompts, generate_texts
from lorakit.evaluate.scores import DemoScores, eval_loss, score_demo

__all__ = ["chat_prompts", "generate_texts", "eval_loss", "score_demo", "DemoScores"]

"""lm-evaluation-harness integration: ``harness`` is the ``pldr`` lm-eval model."""

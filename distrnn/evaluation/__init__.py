"""Exact counting of right answers over every rank (counting), the validation/test evaluator, the figures."""

"""Pareto fronts and plots from MLflow: pure computation (pareto), reading (runs), plots, report."""

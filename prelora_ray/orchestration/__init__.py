"""Ray (Train and Tune) and Optuna live here and only here."""

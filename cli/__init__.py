"""The command-line modes of main.py (generate, prepare, import/export, plan, lm_eval) and
the workdir lock: the application layer, above training and evaluation."""

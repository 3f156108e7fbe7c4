"""`python -m autotune`: Optuna search over TurboAttention kernel configs, per GPU and model."""

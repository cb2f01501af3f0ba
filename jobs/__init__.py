"""Jobs: models, training, tuning, evaluation, tracking, the promotion gate (may import `streams`)."""

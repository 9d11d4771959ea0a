"""The thin experiment runner: config, loop, logging, progress, plots, evaluation."""

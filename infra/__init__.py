"""Infrastructure: parallelism, rollout engines, the grader pool, checkpoints, the loss head, the
hub and settings parsing. The science is in the experiments, common.py and the worlds."""

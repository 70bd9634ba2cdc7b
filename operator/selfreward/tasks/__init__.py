"""Synthetic tasks with a rule-checkable ground truth, for the quickstart and for
reproducing the paper's per-iteration table in kind on a CPU (bench/reproduce.py).

A task module builds every data file a run needs from a seed and carries the verifier
that ``spec.eval.verifier`` names (``selfreward.tasks.<task>:verify``)."""

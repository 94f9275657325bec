"""What a run measured, in numbers and pictures: statistics and verdicts, plots."""

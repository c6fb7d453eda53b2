"""Research runs: simulate, sweep, compare, the baselines and the reports they write."""

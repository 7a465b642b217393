"""`moelab scaling`: when does the MoE pay at a user's scale? A grid of dense and MoE runs
(grid.py), a loss law per family with bootstrap intervals (law.py), the efficiency leverage
of the MoE over dense in FLOPs and seconds (leverage.py, fit.py), a prediction checked on a
run trained after the fit (predict.py), and the report (report.py)."""

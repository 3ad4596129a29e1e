"""corral side by side with the Python peers (issue 15): ``bench/peers/run.py``."""
